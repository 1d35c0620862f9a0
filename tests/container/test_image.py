"""The image: one for every role, built from the repository, nothing fetched at run time."""

from __future__ import annotations

import re

from tests.container.conftest import ROOT


def test_image_runs_every_role_as_the_right_user(docker, image):
    info = docker.inspect(image, "image")
    config = info["Config"]
    assert config["User"] == "10001:10001"  # the default: unprivileged (the controller)
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "chunkfs-csi"]
    labels = config["Labels"]
    for key in ("title", "description", "licenses", "version", "revision", "created",
                "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    out = docker.docker("run", "--rm", "--network", "host", image, "--help").stdout
    assert "--role {controller,node,all,mounter}" in out
    # the tools the node roles call exist, from Debian, inside the image
    tools = docker.docker("run", "--rm", "--network", "host", "--entrypoint", "sh", image,
                          "-c", "for t in chunkfs fusermount3 mount umount tini python3; do "
                          "command -v $t || exit 1; done && python3 -c "
                          "'import pyfuse3, grpc; print(pyfuse3.__version__)'").stdout
    assert "/opt/chunkfs-csi/bin/chunkfs" in tools and "/usr/bin/fusermount3" in tools
    assert "/usr/bin/tini" in tools


def test_the_dockerfile_builds_anywhere():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)
    # no architecture-specific step: the same file builds on amd64 and arm64
    assert not re.search(r"amd64|x86_64|aarch64|arm64|--platform", text.split("\n", 12)[-1])
    # nothing is downloaded by a RUN step except through apt and pip
    assert not re.search(r"\b(curl|wget|ADD\s+https?:)", text)
