"The shared helpers work: a zoo Learner trains under 2-process DDP on CPU, and save/load round-trips."
import torch
from helpers import run_ddp, ddp_fit, params_digest, roundtrip_save_load
from corsd_suite.data import digits_dls
from corsd_suite.models import zoo_learner
from corsd_suite.core import seed_everything

def _fit_on_rank(rank):
    seed_everything(0)
    learn = zoo_learner(digits_dls(16, bs=32, device='cpu'), 'resnet8')
    before = params_digest(learn.model)
    ddp_fit(learn, 1, 1e-2)
    return dict(before=before, after=params_digest(learn.model), n_train=len(learn.dls.train))

def test_ddp_two_ranks_agree():
    r0, r1 = run_ddp(_fit_on_rank)
    assert r0['before'] == r1['before']
    assert r0['after'] != r0['before']              # it trained
    assert abs(r0['after'] - r1['after']) < 1e-6   # DDP kept the replicas identical

def test_save_load_roundtrip(tmp_path):
    mk = lambda: zoo_learner(digits_dls(16, device='cpu'), 'resnet8')
    learn = mk()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    new = roundtrip_save_load(learn, mk, tmp_path)
    x = learn.dls.valid.one_batch()[0]
    learn.model.eval(); new.model.eval()
    assert torch.allclose(learn.model(x), new.model(x))
