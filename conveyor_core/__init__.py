"""What Conveyor's gateway and runtime share: settings, records, backend ports."""
