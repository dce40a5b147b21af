"Real datasets load from CORSD_DATA; a wrong path gives an error naming dataset, folder, files and CORSD_DATA."
import os, pytest, torch
from corsd_suite.data import load_dataset, dataset_dls, domain_pair, data_root

DATA = os.environ['CORSD_DATA']

@pytest.mark.parametrize('name,n_train,n_test,shape', [('mnist', 60000, 10000, (1,28,28)), ('fashion_mnist', 60000, 10000, (1,28,28))])
def test_real_datasets_load(name, n_train, n_test, shape):
    tr, te = load_dataset(name, DATA, train=True), load_dataset(name, DATA, train=False)
    assert (len(tr), len(te), tr.shape, tr.c) == (n_train, n_test, shape, 10)
    assert tr.x.dtype == torch.uint8 and tr.x.float().mean() > 10

def test_usps_test_split_and_missing_train_split():
    te = load_dataset('usps', DATA, train=False)
    assert (len(te), te.shape) == (2007, (1,16,16))
    with pytest.raises(FileNotFoundError, match=r"usps.*usps\.bz2.*CORSD_DATA"): load_dataset('usps', DATA, train=True)

def test_wrong_path_error_names_everything(tmp_path, monkeypatch):
    monkeypatch.setenv('CORSD_DATA', str(tmp_path))
    with pytest.raises(FileNotFoundError) as e: load_dataset('fashion_mnist')
    msg = str(e.value)
    for part in ['fashion_mnist', str(tmp_path), 'FashionMNIST/raw/train-images-idx3-ubyte', 'CORSD_DATA']: assert part in msg

def test_no_root_and_no_env(monkeypatch):
    monkeypatch.delenv('CORSD_DATA')
    with pytest.raises(FileNotFoundError, match='CORSD_DATA'): data_root()

def test_dataset_dls_balanced_subset():
    dls = dataset_dls('mnist', DATA, n_per_class=30, bs=50, device='cpu')
    assert len(dls.train_ds) == 300 and torch.bincount(dls.train_ds.y).tolist() == [30]*10
    assert len(dls.valid_ds) == 10000
    x, y = dls.one_batch()
    assert x.shape == (50,1,28,28) and 0 <= x.min() and x.max() <= 1

def test_domain_pair_mnist_usps():
    p = domain_pair('mnist', 'usps', size=28, n_per_class=10)
    assert p.source_train.shape == p.target_adapt.shape == (1,28,28)
    assert len(p.target_adapt) + len(p.target_eval) == 2007 and 'divided' in p.protocol
    # halves are disjoint: no image of the adaptation half appears in the evaluation half
    a = {bytes(x.numpy()) for x in p.target_adapt.x}; b = {bytes(x.numpy()) for x in p.target_eval.x}
    assert len(a & b) < 5   # USPS has a few duplicate images; the split itself is by index
