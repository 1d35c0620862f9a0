"""The key schema is defined once (chunkfs/meta/schema.py) and says what it documents.

The documented format (the schema's docstring) is what existing volumes hold, so the
definitions must produce exactly those keys and fields; and the Lua scripts must take
theirs from the definitions, never spell them again (a letter changed in one place
only would corrupt volumes silently). tests/integration/test_format.py checks what the
scripts actually write.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chunkfs.meta import namespace, schema, scripts
from chunkfs.meta.schema import (
    ATTR_FIELDS,
    LUA,
    PER_INODE,
    Attr,
    InodeField,
    Keys,
    VolumeField,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = schema.__doc__ or ""

# the inode fields as the docstring names them (letters, then their meanings)
DOCUMENTED_INODE = {"m mode": "MODE", "u uid": "UID", "g gid": "GID", "n nlink": "NLINK",
                    "s size": "SIZE", "a/t/c atime/mtime/ctime": "ATIME/MTIME/CTIME", "r rdev": "RDEV",
                    "p parent": "PARENT", "l symlink target": "TARGET", "d inline data": "DATA"}


def _documented_entry(key: str) -> str:
    """The docstring's paragraph about ``cfs{ID}:<key>`` (up to the next key)."""
    m = re.search(rf"^\s+cfs\{{ID\}}:{re.escape(key)}\s+(HASH|SET|STRING)(.*?)(?=^\s+cfs|\Z)", DOC,
                  re.S | re.M)
    assert m, key
    return " ".join(m.group(2).split())


def test_the_keys_are_the_documented_ones():
    documented = set(re.findall(r"^\s+(cfs\{ID\}:\S+)", DOC, re.M))
    k = Keys("ID")
    built = {k.vol, k.idx, k.orphans, k.sessions, k.pending, k.settled, k.publications,
             k.reply("<request>"), *(key.replace("7", "<ino>") for key in k.per_inode(7))}
    assert built == documented
    assert [key.removeprefix("cfs{ID}:").removesuffix("7") for key in k.per_inode(7)] == list(PER_INODE)


def test_the_inode_fields_are_the_documented_ones():
    text = _documented_entry("i<ino>")
    defined = {name: value for name, value in vars(InodeField).items() if name.isupper()}
    named = {}
    for phrase, names in DOCUMENTED_INODE.items():
        assert phrase in text
        named |= dict(zip(names.split("/"), phrase.split()[0].split("/"), strict=True))
    assert named == defined
    assert ATTR_FIELDS == ("m", "u", "g", "n", "s", "a", "t", "c", "r")
    attr = Attr.from_fields(5, [b"33188", b"1", b"2", b"1", b"10", b"11", b"12", b"13", None])
    assert attr == Attr(5, 33188, 1, 2, 1, 10, 11, 12, 13, 0)


def test_every_volume_field_is_documented():
    text = _documented_entry("vol")
    for name, value in vars(VolumeField).items():
        if name.isupper():
            assert re.search(rf"\b{value}\b", text), value


def _lua_table(name: str) -> dict[str, str]:
    m = re.search(rf"^local {name} = {{(.*)}}$", LUA, re.M)
    assert m, name
    return dict(re.findall(r"(\w+) = '([^']*)'", m.group(1)))


def test_the_lua_schema_is_generated_from_the_definitions():
    assert _lua_table("F") == {n.lower(): v for n, v in vars(InodeField).items() if n.isupper()}
    assert _lua_table("V") == {n.lower(): v for n, v in vars(VolumeField).items() if n.isupper()}
    builder = r"^local function (\w+)_key\(prefix, ino\) return prefix \.\. '(\w)' \.\. ino end$"
    builders = dict(re.findall(builder, LUA, re.M))
    k = Keys("ID")
    for name, letter in builders.items():
        assert getattr(k, name)(7) == f"cfs{{ID}}:{letter}7"
    assert set(builders.values()) == set(PER_INODE) and len(builders) == len(PER_INODE)
    assert re.search(r"^local ATTR_FIELDS = {'m', 'u', 'g', 'n', 's', 'a', 't', 'c', 'r'}$", LUA, re.M)


def _lua_sources() -> dict[str, str]:
    """Every Lua script of the project, without the generated schema it starts with."""
    out = {f"scripts.{n}": v for n, v in vars(scripts).items() if n.isupper() and isinstance(v, str)
           and "redis.call" in v}
    out |= {f"namespace.{n}": v for n, v in vars(namespace).items()
            if n.startswith("_") and isinstance(v, str) and "redis.call" in v}
    assert len(out) >= 16
    return {name: src.replace(LUA, "") for name, src in out.items()}


@pytest.mark.parametrize(("name", "source"), sorted(_lua_sources().items()))
def test_no_script_spells_a_key_or_a_field(name, source):
    assert not re.findall(r"\.\. '[a-z]' \.\.", source), "a key built by hand"
    assert not re.findall(r"'[a-z]'", source), "an inode field letter"
    volume_fields = [v for n, v in vars(VolumeField).items() if n.isupper()]
    assert not re.findall(rf"'({'|'.join(volume_fields)})'", source), "a volume field"
