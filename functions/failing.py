"""Always raises: shows how a remote error travels back to the caller."""

from conveyor import task


def check_order(order: dict) -> None:
    if "quantity" not in order:
        raise KeyError("quantity")
    raise ValueError(f"quantity must be positive, got {order['quantity']}")


@task
def failing(order: dict) -> None:
    print("validating", order)
    check_order(order)
