"""Provision with the stock Azure IoT device SDK for Python, then talk to the assigned
hub (edgedps itself) with the stock IoTHubDeviceClient: twin, reported properties,
telemetry, desired-property patches, cloud-to-device messages and direct methods.

Reads a JSON request on stdin ({"serverCaFile", "cases": [...]}) and prints one JSON
object per case. The device announces that it is ready (its handlers are set) by
sending a telemetry message; the Rust test, as the operator, then patches the desired
properties, sends a cloud-to-device message and calls a method. Nothing is patched.
"""

import json
import threading

from azure.iot.device import Message, MethodResponse

from provision import hub_client, provisioning_client, run_cases

WAIT_SECONDS = 60


def provision(case, server_ca):
    result = provisioning_client(case, server_ca).register()
    if result.status != "assigned":
        raise RuntimeError("not assigned: %s" % result.status)
    return result.registration_state


def run(case, server_ca):
    state = provision(case, server_ca)
    out = {
        "name": case["name"],
        "assignedHub": state.assigned_hub,
        "deviceId": state.device_id,
        "messages": [],
    }
    client = hub_client(case, state, server_ca)
    desired_seen = threading.Event()
    messages_seen = threading.Event()
    method_seen = threading.Event()

    def on_desired(patch):
        out["desiredPatch"] = patch
        desired_seen.set()

    def on_message(message):
        out["messages"].append(
            {
                "data": message.data.decode("utf-8"),
                "properties": message.custom_properties,
                "messageId": message.message_id,
            }
        )
        if len(out["messages"]) >= case["expectedMessages"]:
            messages_seen.set()

    def on_method(request):
        out["method"] = {"name": request.name, "payload": request.payload}
        response = MethodResponse.create_from_method_request(
            request, 200, {"echo": request.payload}
        )
        client.send_method_response(response)
        method_seen.set()

    client.connect()
    out["twin"] = client.get_twin()
    client.patch_twin_reported_properties({"firmware": "1.2.3", "case": case["name"]})
    client.on_twin_desired_properties_patch_received = on_desired
    client.on_message_received = on_message
    client.on_method_request_received = on_method
    # Ready: the operator acts once this arrives.
    client.send_message(
        Message(
            json.dumps({"temperature": 21}),
            content_encoding="utf-8",
            content_type="application/json",
        )
    )
    for name, seen in [
        ("desired patch", desired_seen),
        ("cloud-to-device messages", messages_seen),
        ("method call", method_seen),
    ]:
        if not seen.wait(WAIT_SECONDS):
            out.setdefault("missing", []).append(name)
    out["twinAfter"] = client.get_twin()
    client.shutdown()
    return out


if __name__ == "__main__":
    run_cases(run)
