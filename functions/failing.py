"""Always raises: shows how a remote error travels back to the caller."""


def check_order(order: dict) -> None:
    if "quantity" not in order:
        raise KeyError("quantity")
    raise ValueError(f"quantity must be positive, got {order['quantity']}")


def failing(order: dict) -> None:
    print("validating", order)
    check_order(order)
