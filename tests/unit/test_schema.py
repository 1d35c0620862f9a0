"""The key schema is defined once (chunkfs/meta/schema.py) and says what it documents.

The documented format (the schema's docstring) is what existing volumes hold, so the
definitions must produce exactly those keys and fields; and the Lua scripts must take
theirs from the definitions, never spell them again (a letter changed in one place
only would corrupt volumes silently). tests/integration/test_format.py checks what the
scripts actually write.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from chunkfs import gc_lease
from chunkfs.meta import namespace, schema, scripts
from chunkfs.meta.schema import (
    ATTR_FIELDS,
    LUA,
    PER_INODE,
    Attr,
    GcScheduleField,
    GcStateField,
    InodeField,
    Keys,
    VolumeField,
    VolumeRecord,
    inode_limit,
)
from csi import gc_runner

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
    for table, cls in (("V", VolumeField), ("G", GcStateField), ("S", GcScheduleField)):
        assert _lua_table(table) == {n.lower(): v for n, v in vars(cls).items() if n.isupper()}
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
    out |= {"gc_lease._LEASE": gc_lease._LEASE, "gc_runner._SCHEDULE": gc_runner._SCHEDULE}
    assert len(out) >= 18
    return {name: src.replace(LUA, "") for name, src in out.items()}


@pytest.mark.parametrize(("name", "source"), sorted(_lua_sources().items()))
def test_no_script_spells_a_key_or_a_field(name, source):
    assert not re.findall(r"\.\. '[a-z]' \.\.", source), "a key built by hand"
    assert not re.findall(r"'[a-z]'", source), "an inode field letter"
    fields = [v for cls in (VolumeField, GcStateField, GcScheduleField)
              for n, v in vars(cls).items() if n.isupper()]
    assert not re.findall(rf"'({'|'.join(fields)})'", source), "a volume or GC field"


# Redis hash commands whose arguments would be field names
_HASH_CALLS = {"hget", "hmget", "hset", "hdel", "hincrby", "hexists", "hsetnx", "execute"}


def _spelled_fields(path: Path) -> list[str]:
    fields = {v for cls in (InodeField, VolumeField) for n, v in vars(cls).items() if n.isupper()}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _HASH_CALLS):
            continue
        values = list(node.args)
        for kw in node.keywords:
            if kw.arg == "mapping" and isinstance(kw.value, ast.Dict):
                values += [key for key in kw.value.keys if key is not None]
        found += [f"{path}:{node.lineno}: {v.value!r}" for v in values
                  if isinstance(v, ast.Constant) and v.value in fields]
    return found


def test_no_module_spells_a_field_in_a_redis_call():
    modules = [p for pkg in ("chunkfs", "csi") for p in sorted((ROOT / pkg).rglob("*.py"))
               if p.name != "schema.py" and "v1" not in p.parts]
    assert [hit for p in modules for hit in _spelled_fields(p)] == []


def test_the_check_sees_a_spelled_field(tmp_path):
    probe = tmp_path / "probe.py"
    for source in ["r.hget(k.vol, 'used')\n", "pipe.hset(k.inode(1), mapping={'m': 1})\n",
                   "r.execute('HGET', key, 'l')\n"]:
        probe.write_text(source)
        assert _spelled_fields(probe), source
    probe.write_text("r.hget(k.vol, V.USED)\nr.hget(GC_STATE, 'gen')\n")
    assert _spelled_fields(probe) == []


def test_a_volume_record_is_parsed_from_its_hash_once():
    raw = {b"name": b"v", b"kind": b"volume", b"capacity": b"1073741824", b"used": b"4166",
           b"inodes": b"6", b"next_ino": b"6", b"epoch": b"3", b"writer": b"node-a",
           b"created": b"1764639000.25", b"block_size": b"1048576", b"source": b"volume:w",
           b"slicebytes": b"36", b"frozen": b"1764639000250"}
    rec = VolumeRecord.parse(raw)
    assert rec == VolumeRecord(name="v", kind="volume", capacity=1 << 30, used=4166, inodes=6,
                               next_ino=6, epoch="3", writer="node-a", created=1764639000.25,
                               block_size=1 << 20, source="volume:w", slicebytes=36,
                               frozen=1764639000250)
    assert rec.inode_limit == inode_limit(1 << 30) and rec.max_inodes == 0
    assert VolumeRecord.parse({**raw, b"max_inodes": b"20"}).inode_limit == 20
    snap = VolumeRecord.parse({b"kind": b"snapshot", b"ready": b"1", b"source_volume": b"v"})
    assert (snap.ready, snap.source_volume, snap.block_size) == (True, "v", 4 << 20)
    assert VolumeRecord.parse({b"ready": b"0"}).ready is False
    # what a mount of a volume whose hash is gone sees: the defaults, as before
    assert VolumeRecord.parse({}) == VolumeRecord()
