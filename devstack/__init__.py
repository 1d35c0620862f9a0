"""Development infrastructure: local backends and demos, never installed.

``devstack.localstack`` starts and stops the real Redis and SeaweedFS the tests, the
benchmark and ``scripts/local-stack.sh`` use; ``devstack.walkthrough`` plays Kubernetes
against the CSI plugins. pyproject.toml installs only ``chunkfs`` and ``csi`` (and the
image copies only those), so nothing here ships; nothing under ``chunkfs/`` or ``csi/``
may import it (tests/unit/test_packaging.py checks both). Run from the checkout:
``python -m devstack.localstack up``.
"""
