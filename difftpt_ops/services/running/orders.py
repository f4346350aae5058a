"""Several orders of an online run: what `--order-seed N` and `--orders K` put in the spec or the sweep, checked as
the user typed them. (`results` and `compare` summarise the runs of one configuration over its orders.)"""

from __future__ import annotations

from difftpt_ops.core.errors import InputError
from difftpt_ops.services.running import online


def check_has_order(method: str, option: str, value: object) -> None:
    """`--order-seed` / `--orders` on an episodic method: bad input naming the option the user typed."""
    online.ensure_registered(method)
    if not online.is_online_method(method):
        raise InputError(option, value, f"only online methods have an order; {method} is not one")


def order_seed_value(method: str, order_seed: int) -> str:
    """The spec's `order_seed` of `--order-seed N`, checked as typed (it would be named `--set order_seed`)."""
    check_has_order(method, "--order-seed", order_seed)
    if order_seed < 0:
        raise InputError("--order-seed", order_seed, "must be >= 0")
    return str(order_seed)


def order_sweep(method: str, orders: int) -> str:
    """The `--sweep` item of `--orders K`: order_seed=0,...,K-1 (only online methods have an order)."""
    check_has_order(method, "--orders", orders)
    if orders < 1:
        raise InputError("--orders", orders, "must be >= 1")
    return "order_seed=" + ",".join(str(seed) for seed in range(orders))
