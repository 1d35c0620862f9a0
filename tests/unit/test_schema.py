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
from types import ModuleType

import pytest

from chunkfs import gc_lease
from chunkfs.meta import namespace, schema, scripts
from chunkfs.meta.schema import (
    ATTR_FIELDS,
    PER_INODE,
    Attr,
    GcScheduleField,
    GcStateField,
    InodeField,
    Keys,
    VolumeField,
    VolumeRecord,
    inode_limit,
    lua,
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
    namespace_keys = {getattr(k, slot) for slot in Keys.__slots__ if slot not in ("ns", "prefix")}
    built = {*namespace_keys, k.reply("<request>"),
             *(key.replace("7", "<ino>") for key in k.per_inode(7))}
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


FIELD_CLASSES = {"F": InodeField, "V": VolumeField, "G": GcStateField, "S": GcScheduleField}


def test_lua_fills_in_every_field_from_the_definitions():
    for letter, cls in FIELD_CLASSES.items():
        for name, value in vars(cls).items():
            if name.isupper():
                assert lua(f"redis.call('HGET', KEYS[1], {letter}.{name.lower()})") == \
                    f"redis.call('HGET', KEYS[1], '{value}')"
    assert lua("redis.call('HMGET', KEYS[1], ATTR_FIELDS)") == \
        "redis.call('HMGET', KEYS[1], 'm', 'u', 'g', 'n', 's', 'a', 't', 'c', 'r')"
    assert lua("for _, t in ipairs(PER_INODE) do end") == \
        "for _, t in ipairs({'i', 'd', 'b', 'x', 'y'}) do end"
    with pytest.raises(ValueError, match="F.mod"):
        lua("redis.call('HGET', KEYS[1], F.mod)")  # a typo fails at import, not in Redis


def test_lua_builds_the_keys_keys_builds():
    k = Keys("ID")
    script = lua("return {inode_key(p, 7), dir_key(p, 7), blocks_key(p, 7), xattr_key(p, 7),"
                 " slices_key(ARGV[2], ino), idx_key(p), orphans_key(p)}")
    assert script == ("return {(p .. 'i' .. 7), (p .. 'd' .. 7), (p .. 'b' .. 7), (p .. 'x' .. 7),"
                      " (ARGV[2] .. 'y' .. ino), (p .. 'idx'), (p .. 'orphans')}")
    built = re.findall(r"\(p \.\. '(\w+)'(?: \.\. 7)?\)", script)
    assert [k.prefix + b + "7" for b in built[:4]] == [k.inode(7), k.dir(7), k.blocks(7), k.xattr(7)]
    assert [k.prefix + b for b in built[4:]] == [k.idx, k.orphans]
    assert lua(script) == script  # filling in twice changes nothing
    with pytest.raises(ValueError, match="inode_key"):
        lua("return inode_key(prefix_of(x), 7)")  # only names: the text stays what it says


def _lua_modules() -> dict[str, ModuleType]:
    return {"scripts": scripts, "namespace": namespace, "gc_lease": gc_lease, "gc_runner": gc_runner}


def _script_templates() -> list[tuple[str, str]]:
    """The Lua as written in the modules' source (before ``lua()``): every string literal,
    or piece of an f-string, of a script."""
    out = []
    for modname, module in _lua_modules().items():
        path = Path(module.__file__ or "")
        for node in ast.walk(ast.parse(path.read_text())):
            parts = node.values if isinstance(node, ast.JoinedStr) else [node]
            texts = [p.value for p in parts if isinstance(p, ast.Constant) and isinstance(p.value, str)]
            if isinstance(node, ast.JoinedStr | ast.Constant) and any("redis.call" in t for t in texts):
                out += [(f"{modname}:{node.lineno}", t) for t in texts]
    assert len({where for where, _ in out}) >= 18
    return out


@pytest.mark.parametrize("source", [pytest.param(text, id=f"{where}#{i}")
                                    for i, (where, text) in enumerate(_script_templates())])
def test_no_script_spells_a_key_or_a_field(source):
    assert not re.findall(r"\.\. '[a-z]' \.\.", source), "a key built by hand"
    assert not re.findall(r"'[a-z]'", source), "an inode field letter"
    fields = [v for cls in (VolumeField, GcStateField, GcScheduleField)
              for n, v in vars(cls).items() if n.isupper()]
    assert not re.findall(rf"'({'|'.join(fields)})'", source), "a volume or GC field"


def test_every_script_is_filled_in():
    for modname, module in _lua_modules().items():
        for name, value in vars(module).items():
            if isinstance(value, str) and "redis.call" in value:
                assert not re.search(r"\b[FVGS]\.[a-z_]+|\bATTR_FIELDS\b|\bPER_INODE\b", value), \
                    f"{modname}.{name}"
                assert not re.search(
                    r"\b(inode|dir|blocks|xattr|slices|idx|orphans|changed|capture)_key\(", value)


_READ_COMMANDS = {"GET", "HGET", "HMGET", "HGETALL", "HEXISTS", "HKEYS", "HLEN", "HSCAN",
                  "HSTRLEN", "HVALS", "EXISTS", "SISMEMBER", "SMEMBERS", "SCARD", "TIME"}


def _mutations() -> dict[str, str]:
    return {name: value for name, value in vars(scripts).items()
            if isinstance(value, str) and "local function note_changes" in value
            and not name.startswith("_")}


def test_every_write_of_a_mutation_is_seen_by_the_change_tracking():
    """Incremental backups read only what the mutation scripts noted: a script that wrote
    through ``redis.call`` directly, or with a command the tracker does not know, would
    change an inode that the next backup does not read."""
    mutations = _mutations()
    assert {"CREATE", "LINK", "UNLINK", "RENAME", "SETATTR", "TRUNCATE", "COMMIT", "XATTR",
            "PURGE"} <= set(mutations)
    for name, script in mutations.items():
        tracker, _, rest = script.partition("local function note_changes")
        assert "redis.call(" not in rest.split("\nend\n", 1)[1], f"{name} bypasses call()"
        commands = set(re.findall(r"\bcall\('([A-Za-z]+)'", rest))
        assert commands, name
        unknown = commands - set(scripts.TRACKED_WRITES) - _READ_COMMANDS
        assert not unknown, f"{name} calls {unknown}: a write the tracker must know, or a read"
        assert all(c == c.upper() for c in commands), name
        assert "note_changes()\nif type(res) == 'table' and res.err" in rest, name


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
