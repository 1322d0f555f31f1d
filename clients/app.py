"""The Flower ClientApp: the same app in simulation and on real devices.

One reply format for both placements (docs/design.md#reply-format): an ArrayRecord `update` holding the
sum of this node's users' clipped, weighted adapter updates, and a MetricRecord `counts`.
A cohort worker trains whatever users it is sent; a device node holds exactly one user; a
real device (node config `data-path`) reads only its own data (clients/device.py).

The handlers live in `clients.handlers` and are imported on first use: Flower's deployment
runtime starts a fresh ClientApp process per message, importing torch and peft was most of
each such process's cost (experiments/README.md#loopback), and
the SecAgg+ key-exchange and unmasking stages never touch them.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from clients.engine_poll import poll_messages_faster

app = ClientApp()


def _secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod for the train messages of a SecAgg+ round; others pass."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _handle(kind: str, msg: Message, context: Context) -> Message:
    """On a real device, the warm worker handles it (clients/warm.py); otherwise, or if the
    worker cannot be used, this process does."""
    from clients import warm

    if warm.enabled(context.node_config):
        reply = warm.call(kind, msg, context)
        if reply is not None:
            return reply
    from clients import handlers

    return getattr(handlers, kind)(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    if "data-path" in context.node_config and msg.content["task"]["kind"] == "identify":
        from clients.device import identify  # a real device answers who it is without loading torch

        return identify(msg, context)
    return _handle("query", msg, context)


@app.train(mods=[_secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    return _handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle("evaluate", msg, context)


# Flower's simulation engine (`flwr run`, run_simulation) imports this module before it
# starts its message loop: give that loop the shorter poll. A no-op on real devices.
poll_messages_faster(only_if_loaded=True)
