"""Python stubs of the CSI spec v1.12.0 (package ``csi.v1``).

Generated from ``proto/csi.proto`` by ``scripts/gen-proto.sh``; do not edit by hand.
``tests/csi/test_stubs_uptodate.py`` checks that regeneration changes nothing.
"""
