"""``cwm import-hf`` from and to an object store (the tests' real S3 server): the sharded source
is read through cwm_spec.storage, never assumed local, and a remote output is committed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cwm_model.cli import main
from cwm_spec import storage
from tests.model.hf_checkpoint import write_checkpoint
from tests.storage.conftest import bucket_fs, s3_env, s3_server  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_a_sharded_checkpoint_in_a_bucket_imports_as_a_local_one(tmp_path, s3_env, bucket_fs):  # noqa: F811
    source = write_checkpoint(tmp_path / "released", shard="60KB")
    bucket_fs.put(str(source), "cwm/models/released", recursive=True)
    assert main(["import-hf", str(source), str(tmp_path / "local")]) == 0
    assert main(["import-hf", "s3://cwm/models/released", str(tmp_path / "from-s3")]) == 0
    assert main(["import-hf", "s3://cwm/models/released", "s3://cwm/runs/imported"]) == 0
    fetched = storage.local_copy("s3://cwm/runs/imported")  # refuses an uncommitted folder
    expected = load_file(str(tmp_path / "local/model.safetensors"))
    for folder in (tmp_path / "from-s3", fetched):
        got = load_file(str(folder / "model.safetensors"))
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[name], expected[name]) for name in expected)
        assert (folder / "tokenizer.json").read_bytes() == \
            (tmp_path / "local/tokenizer.json").read_bytes()
    assert main(["import-hf", "s3://cwm/models/missing", str(tmp_path / "x")]) == 1
