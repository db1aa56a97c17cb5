"""Provision devices with the stock Azure IoT device SDK for Python (azure-iot-device).

Reads a JSON list of cases on stdin, runs each through ProvisioningDeviceClient against
edgedps on localhost:8883 (the SDK's fixed port; 443 for a case with "websockets":
true, MQTT over WebSocket), and prints one JSON object per case. A case with "hub":
true then connects IoTHubDeviceClient to the assigned hub the same way, reads its twin
and sends one telemetry message. The SDK is used exactly as a device would use it:
nothing here is patched.
"""

import json
import sys
import traceback

from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient, X509


def provisioning_client(case, server_ca):
    """The SDK's provisioning client for a case: symmetric key or X.509 files."""
    common = dict(
        provisioning_host="localhost",
        registration_id=case["registrationId"],
        id_scope=case["idScope"],
        server_verification_cert=server_ca,
        websockets=case.get("websockets", False),
    )
    if case["kind"] == "symmetricKey":
        return ProvisioningDeviceClient.create_from_symmetric_key(
            symmetric_key=case["key"], **common
        )
    return ProvisioningDeviceClient.create_from_x509_certificate(
        x509=X509(cert_file=case["certFile"], key_file=case["keyFile"]), **common
    )


def run(case, server_ca):
    client = provisioning_client(case, server_ca)
    if "payload" in case:
        client.provisioning_payload = case["payload"]
    result = client.register()
    state = result.registration_state
    payload = state.response_payload if state else None
    # The SDK hands `payload` back as JSON text.
    if isinstance(payload, str):
        payload = json.loads(payload)
    out = {
        "name": case["name"],
        "status": result.status,
        "operationId": result.operation_id,
        "assignedHub": state.assigned_hub if state else None,
        "deviceId": state.device_id if state else None,
        "substatus": state.sub_status if state else None,
        "etag": state.etag if state else None,
        "payload": payload,
    }
    if case.get("hub") and state:
        out["twin"] = use_hub(case, state, server_ca)
    return out


def hub_client(case, state, server_ca):
    """The stock IoTHubDeviceClient for the hub `state` assigned, with the case's
    credential, over WebSocket if the case says so."""
    common = dict(
        hostname=state.assigned_hub,
        device_id=state.device_id,
        server_verification_cert=server_ca,
        websockets=case.get("websockets", False),
    )
    if case["kind"] == "symmetricKey":
        return IoTHubDeviceClient.create_from_symmetric_key(
            symmetric_key=case["key"], **common
        )
    return IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(cert_file=case["certFile"], key_file=case["keyFile"]), **common
    )


def use_hub(case, state, server_ca):
    """The assigned hub, as the device was provisioned: its twin, after one telemetry
    message."""
    client = hub_client(case, state, server_ca)
    client.connect()
    try:
        client.send_message(Message(json.dumps({"over": "websocket"})))
        return client.get_twin()
    finally:
        client.shutdown()


def run_cases(run_one):
    """Reads the request on stdin and prints what `run_one` makes of each case, one JSON
    object per line; a case that raises is reported and the next one runs."""
    request = json.load(sys.stdin)
    with open(request["serverCaFile"]) as f:
        server_ca = f.read()
    for case in request["cases"]:
        try:
            out = run_one(case, server_ca)
        except Exception as e:  # report, keep going: the Rust test asserts per case
            out = {"name": case["name"], "error": repr(e), "trace": traceback.format_exc()}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    run_cases(run)
