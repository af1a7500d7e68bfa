"""One 2-rank run (gloo on CPU) of every scenario group, shared by the tests of this folder.

Starting ranks costs seconds (each imports torch, transformers and qpeft), so the groups run in a
single launch; the single-process references the ranks load are written first.
"""

import pytest
import torch

import qpeft
from tests.parallel.cases import trained_block
from tests.parallel.launch import run_ranks
from tests.parallel.worker import GROUPS

WORLD = 2


@pytest.fixture(scope="session")
def outdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parallel")
    ref = trained_block()
    torch.save(ref.state_dict(), path / "ref_sd.pt")
    qpeft.save(ref, path / "ref_ckpt")
    qpeft.disable_adapters(ref, adapters_to_disable="b")  # the loaded flags are checked too
    qpeft.save_adapters(ref, path / "ref_adapters")
    torch.save(trained_block("nvfp4").state_dict(), path / "ref_nvfp4_sd.pt")
    run_ranks(",".join(GROUPS), path, WORLD)
    return path
