# SSH access with the published SDK 1.0.3 (driven by machines_sdk.rs's
# `ssh_access_through_the_servers_endpoint`): machines A and B in this
# namespace, C in another; grants for A (as `app`) and C; a malformed key.
# Prints one JSON line for the Rust side, which runs the real ssh client.
import json, os
from nullspace import Machine
from nullspace.errors import MachineError

key, key_c = os.environ["NS_KEY"], os.environ["NS_KEY_C"]
other = os.environ["NS_OTHER_KEY"]
a = Machine.create(template="web")
b = Machine.create(template="web")
# C in another namespace, from this one's template made public.
from nullspace import Template
Template.set_visibility("web", "public")
c = Machine.create(template="team-a/web", api_key=other)

acc = a.create_ssh_access(public_key=open(key + ".pub").read(), identity_file=key,
                          user="app", expires_in_minutes=5)
assert acc.user == a.id and acc.port > 0, acc
assert acc.certificate.startswith("ssh-ed25519-cert-v01@openssh.com "), acc.certificate
assert open(acc.certificate_file).read().strip() == acc.certificate.strip()
assert "StrictHostKeyChecking=yes" in acc.command, acc.command
known = open(acc.known_hosts_file).read()
assert f"[{acc.host}]:{acc.port} ssh-ed25519 " in known, known

acc_c = Machine.connect(c.id, api_key=other).create_ssh_access(
    public_key=open(key_c + ".pub").read(), identity_file=key_c, user="root")

# A key the server cannot certify: one clear line, invalid_request.
bad = {}
for name, text in (("malformed", "ssh-ed25519 AAAA!!notbase64"),
                   ("rsa", open(os.environ["NS_RSA"] + ".pub").read())):
    try:
        a.create_ssh_access(public_key=text)
        raise AssertionError(f"{name} key accepted")
    except MachineError as e:
        bad[name] = [e.code, str(e)]
# Another namespace's machine is not found.
try:
    Machine.connect(c.id, api_key=other)  # exists for its owner
    from nullspace.client import NullspaceClient
    NullspaceClient().request("POST", f"/v1/machines/{c.id}/ssh-access",
                              json={"public_key": open(key + ".pub").read()})
    raise AssertionError("minted access to another namespace's machine")
except MachineError as e:
    bad["other_namespace"] = [e.code, str(e)]

print("SSH " + json.dumps({
    "a": a.id, "b": b.id, "c": c.id,
    "command": acc.command, "port": acc.port, "access_id": acc.access_id,
    "command_c": acc_c.command, "access_c": acc_c.access_id,
    "bad": bad,
}))
