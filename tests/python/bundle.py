"""Provision devices from `edgedps manufacture batch` bundles with the stock Azure IoT
device SDK for Python, reading nothing but the bundle: the README's five lines.

Reads {"bundles": [dir, ...]} on stdin and prints one JSON object per bundle.
"""

import json
import os
import sys
import traceback

from azure.iot.device import ProvisioningDeviceClient, X509


def provision(bundle):
    path = lambda name: os.path.join(bundle, name)  # noqa: E731
    p = json.load(open(path("provisioning.json")))
    common = dict(
        provisioning_host=p["host"],
        registration_id=p["registrationId"],
        id_scope=p["idScope"],
        server_verification_cert=open(path("trust.pem")).read(),
    )
    if p["attestation"] == "x509":
        client = ProvisioningDeviceClient.create_from_x509_certificate(
            x509=X509(path("device.pem"), path("device.key")), **common
        )
    else:
        key = open(path("symmetric-key")).read().strip()
        client = ProvisioningDeviceClient.create_from_symmetric_key(symmetric_key=key, **common)
    result = client.register()
    return {
        "bundle": bundle,
        "status": result.status,
        "deviceId": result.registration_state.device_id,
        "assignedHub": result.registration_state.assigned_hub,
    }


def main():
    for bundle in json.load(sys.stdin)["bundles"]:
        try:
            out = provision(bundle)
        except Exception as e:  # report, keep going: the Rust test asserts per bundle
            out = {"bundle": bundle, "error": repr(e), "trace": traceback.format_exc()}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
