"""The fedqf ClientApp: a thin relay. It imports neither torch nor opacus.

In deployment Flower starts a fresh ClientApp process for every message; the work happens in the institution's
long-lived service (named by the SuperNode's node config `fedqf-service`), which keeps data, model, privacy ledger
and CKKS context in memory. In a simulation there is no service: the institution runs in-process.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


def _relay(message: Message, context: Context) -> Message:
    service = context.node_config.get("fedqf-service")
    message_type = message.metadata.message_type
    if service:
        from fedqf.service_client import call_institution_service

        wait = float(context.node_config.get("fedqf-service-wait", 0))  # a worker group restarting: wait for it
        content = call_institution_service(str(service), message_type, message.content, wait=wait)
    else:
        from fedqf.institution import handle_simulated

        content = handle_simulated(
            message_type,
            message.content,
            node_config=dict(context.node_config),
            run_config=dict(context.run_config),
            state_records=context.state,
        )
    return Message(content, reply_to=message)


@app.train()
def _train(message: Message, context: Context) -> Message:
    return _relay(message, context)


@app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    return _relay(message, context)


@app.query()
def _query(message: Message, context: Context) -> Message:
    return _relay(message, context)
