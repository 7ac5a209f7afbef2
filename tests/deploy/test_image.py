"""The Dockerfile builds the image the manifests assume: a fixed non-root user, tini as the
entrypoint (the manifests pass `python -m services.<x> ...` as args), Tandem installed with NIXL."""

from __future__ import annotations

import re

from tests.deploy.manifests import ALL, ROOT, TANDEM_IMAGE, UID, container_ports, pod_spec, workloads

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        out.append(pending)
        pending = ""
    return out


def final_stage() -> list[str]:
    steps = instructions()
    last_from = max(i for i, step in enumerate(steps) if step.upper().startswith("FROM "))
    return steps[last_from:]


def test_image_runs_as_the_manifests_non_root_user() -> None:
    users = [line.split()[1] for line in final_stage() if line.upper().startswith("USER ")]
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid == gid == str(UID), "numeric uid:gid so runAsNonRoot can check it"
    text = DOCKERFILE.read_text()
    assert re.search(rf"useradd[^\n]*--uid {UID}", text)


def test_entrypoint_takes_the_command_from_the_manifests_args() -> None:
    (entrypoint,) = [line for line in final_stage() if line.upper().startswith("ENTRYPOINT ")]
    assert entrypoint.split(maxsplit=1)[1] == '["/usr/bin/tini", "--"]'
    assert "tini" in " ".join(line for line in final_stage() if line.upper().startswith("RUN "))
    tandem = [
        c for w in workloads(ALL) for c in pod_spec(w)["containers"] if c["image"].startswith(TANDEM_IMAGE)
    ]
    assert tandem
    for c in tandem:
        assert "command" not in c, f"{c['name']}: `command` would bypass tini"
        assert c["args"][0] in ("python", "sleep"), c["name"]


def test_image_exposes_the_ports_the_manifests_declare() -> None:
    (expose,) = [step for step in final_stage() if step.upper().startswith("EXPOSE ")]
    exposed = {int(port.split("/")[0]) for port in expose.split()[1:]}
    for w in workloads(ALL):
        if any(c["image"].startswith(TANDEM_IMAGE) for c in pod_spec(w)["containers"]):
            assert set(container_ports(w).values()) <= exposed, w["metadata"]["name"]


def test_image_installs_tandem_with_nixl_and_the_packages() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install [^\n]*\.\[[^\]]*nixl", text)
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for package in ("shared", "services", "kernels", "proto"):
        assert re.search(rf"^COPY {package} ", text, re.MULTILINE), package
        assert (ROOT / package).is_dir() and package not in ignored
    assert "pyproject.toml" not in ignored and "README.md" not in ignored  # the build needs both
    assert "gcc" in " ".join(final_stage()), "Triton compiles its launcher with a C compiler at run time"
