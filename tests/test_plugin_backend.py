"""A third-party backend, found through a (mocked) ``ilstore.backends`` entry point, passes the
shared conformance suite and is used by name by ``capture``, ``convert`` and the CLI."""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore.cli import cli
from ilstore.convert import convert
from ilstore.errors import CorruptFileError
from ilstore.keys import CallKey, TensorKey
from ilstore.manifest import calls_from_json, calls_to_json, write_json_atomic
from ilstore.records import Record
from ilstore.store import registry
from ilstore.store.base import StepInfo, StoreReader, StoreWriter, check_inside
from ilstore.testing import StoreConformance, assert_bits_equal


# -- the plug-in: per step, raw_<N>/data.bin (bodies back to back) and raw_<N>/meta.json (last) --
class RawWriter(StoreWriter):
    def _open(self) -> None:
        self._step: int | None = None

    def _begin(self, step: int) -> None:
        if self._step != step:
            self._step, self._records, self._tensors = step, [], {}
            (self.run_dir / f"raw_{step}").mkdir(exist_ok=True)
            (self.run_dir / f"raw_{step}" / "data.bin").write_bytes(b"")

    def _write(self, record: Record) -> None:
        self._begin(record.call.step)
        with open(self.run_dir / f"raw_{record.call.step}" / "data.bin", "ab") as fh:
            for path, _node, tensor in self._stored_bodies(record):
                if tensor is not None:  # None: de-duplicated, the earlier tensor's body serves
                    t = tensor.contiguous()
                    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                    self._tensors[str(record.key(path))] = {"offset": fh.tell(), "nbytes": len(data),
                                                            "dtype": str(t.dtype), "shape": list(t.shape)}
                    fh.write(data)
        self._records.append([record.call.module, record.call.call, record.kind, record.structure])

    def _end_step(self, info: StepInfo) -> None:
        self._begin(info.step)
        write_json_atomic(self.run_dir / f"raw_{info.step}" / "meta.json",
                          {"calls": calls_to_json(info.calls), "records": self._records, "tensors": self._tensors})
        self._step = None


class RawReader(StoreReader):
    @classmethod
    def can_open(cls, run_dir: Path) -> bool:
        return any(p.name.startswith("raw_") and (p / "meta.json").is_file() for p in run_dir.iterdir())

    def _list_steps(self) -> list[int]:
        return sorted(int(p.name[4:]) for p in self.run_dir.iterdir() if p.name.startswith("raw_"))

    def _completed_steps(self) -> list[int]:
        return [s for s in self._list_steps() if (self.run_dir / f"raw_{s}" / "meta.json").is_file()]

    def _meta(self, step: int) -> dict[str, Any]:
        path = self.run_dir / f"raw_{step}" / "meta.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CorruptFileError(path, f"unreadable step metadata: {exc}") from None

    def _list_calls(self, step: int) -> list[CallKey]:
        return calls_from_json(self._meta(step)["calls"], step)

    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        for module, index, k, structure in self._meta(call.step)["records"]:
            if (module, index, k) == (call.module, call.call, kind):
                return structure
        return None

    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        entry = self._meta(key.step)["tensors"][str(key)]
        path = check_inside(self.run_dir, self.run_dir / f"raw_{key.step}" / "data.bin")
        with open(path, "rb") as fh:
            fh.seek(entry["offset"])
            data = fh.read(entry["nbytes"])
        if len(data) != entry["nbytes"]:
            raise CorruptFileError(path, f"{key}: truncated ({len(data)} of {entry['nbytes']} bytes)")
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        if not data:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(entry["shape"])


class RawBackend:
    """What the entry point resolves to: an object with ``writer`` and ``reader``."""

    writer = RawWriter
    reader = RawReader


def _fake_entry_points(**kwargs: Any) -> list[metadata.EntryPoint]:
    assert kwargs == {"group": "ilstore.backends"}
    return [metadata.EntryPoint(name="rawbin", value=f"{__name__}:RawBackend", group="ilstore.backends")]


@pytest.fixture(autouse=True)
def plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Install the plug-in as if a package declared it; the registry discovers it itself."""
    monkeypatch.setattr(registry.metadata, "entry_points", _fake_entry_points)
    monkeypatch.setattr(registry, "_plugins", None)
    monkeypatch.setattr(registry, "_loaded", dict(registry._loaded))
    registry._loaded.pop("rawbin", None)


class TestPluginConformance(StoreConformance):
    backend = "rawbin"

    def native_load(self, run_dir: Path, key: TensorKey, meta: dict[str, Any]) -> torch.Tensor:
        import numpy as np

        entry = json.loads((run_dir / f"raw_{key.step}" / "meta.json").read_text())["tensors"][str(key)]
        raw = np.fromfile(run_dir / f"raw_{key.step}" / "data.bin", dtype=np.uint8, count=entry["nbytes"],
                          offset=entry["offset"])
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        return torch.from_numpy(raw.copy()).view(dtype).reshape(entry["shape"]) if raw.size else torch.empty(
            entry["shape"], dtype=dtype)


def test_plugin_found_by_name_for_capture_convert_and_cli(tmp_path: Path) -> None:
    assert dict(ilstore.store.backend_names())["rawbin"] == "plug-in"
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.GELU())
    x = torch.randn(2, 3)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "raw",
                                                  "backend": "rawbin"}) as cap:
        y = model(x)
    assert sorted(os.listdir(cap.run_dir)) == ["ilstore.json", "raw_0", "stats.f64", "stats_keys.jsonl", "steps.jsonl"]
    with ilstore.open_run(cap.run_dir) as run:
        assert run.name == "rawbin" and isinstance(run, RawReader)
        assert_bits_equal(run.load(TensorKey(0, "1", 0, "outputs")), y)
    h5 = convert(cap.run_dir, tmp_path / "h5", to="hdf5")
    back = convert(h5, tmp_path / "back", to="rawbin")
    with ilstore.open_run(back) as run:
        assert run.name == "rawbin" and run.manifest["converted_from"]["backend"] == "hdf5"
        assert_bits_equal(run.load(TensorKey(0, "1", 0, "outputs")), y)
    result = CliRunner().invoke(cli, ["convert", str(back), str(tmp_path / "pt"), "--to", "pt"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "pt"), str(tmp_path / "raw2"), "--to", "rawbin"])
    assert result.exit_code == 0 and "backend rawbin" in result.output, result.output
    listing = CliRunner().invoke(cli, ["ls", str(tmp_path / "raw2")])
    assert listing.exit_code == 0 and "backend rawbin, status complete" in listing.output


def test_broken_plugin_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(**kwargs: Any) -> list[metadata.EntryPoint]:
        return [metadata.EntryPoint(name="broken", value="no_such_module_xyz:Backend", group="ilstore.backends")]

    monkeypatch.setattr(registry.metadata, "entry_points", broken)
    monkeypatch.setattr(registry, "_plugins", None)
    with pytest.warns(UserWarning, match="failed to load"), pytest.raises(ilstore.BackendError, match="broken"):
        convert(tmp_path, tmp_path.parent / "out-broken", to="broken")


def test_registering_leaves_the_classes_alone_and_the_name_reaches_the_manifest(tmp_path: Path) -> None:
    backend = ilstore.register_backend("rawbin2", RawWriter, RawReader)
    assert backend == registry.get_backend("rawbin2") and backend.name == "rawbin2"
    assert RawWriter.name == "" and RawReader.name == ""  # the name lives in the Backend record only
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r2",
                                                  "backend": "rawbin2"}) as cap:
        model(torch.ones(1, 3))
    assert json.loads((cap.run_dir / "ilstore.json").read_text())["backend"] == "rawbin2"
    with ilstore.open_run(cap.run_dir) as run:
        assert run.name == "rawbin2" and isinstance(run, RawReader)
    with ilstore.open_run(convert(cap.run_dir, tmp_path / "again", to="rawbin2")) as run:
        assert run.name == "rawbin2" and run.manifest["backend"] == "rawbin2"
    assert RawWriter.name == "" and RawReader.name == ""


def test_builtins_are_declared_as_a_plugin_is() -> None:
    import importlib

    for name, (path, _hint) in registry.BUILTIN_BACKENDS.items():
        module = importlib.import_module(path)
        backend = registry.get_backend(name)
        assert (backend.writer, backend.reader) == (module.writer, module.reader), name
