"""Real datasets load from CORSD_DATA with the expected counts; every reader checks what it read (corrupt copies made in a
temporary folder); empty sets and an empty CORSD_DATA are refused; a wrong path names dataset, folder, files and CORSD_DATA."""
import os, pickle, shutil
from pathlib import Path
import numpy as np, pytest, torch
from corsd_suite.data import (load_dataset, dataset_dls, domain_pair, data_root, digits, image_dls, check_nonempty,
                              check_dls_nonempty, DataFileError, ImageSet)

DATA = os.environ['CORSD_DATA']

@pytest.mark.parametrize('name,n_train,n_test,shape', [('mnist', 60000, 10000, (1,28,28)), ('fashion_mnist', 60000, 10000, (1,28,28)),
                                                       ('usps', 7291, 2007, (1,16,16)), ('cifar10', 50000, 10000, (3,32,32))])
def test_real_datasets_load(name, n_train, n_test, shape):
    tr, te = load_dataset(name, DATA, train=True), load_dataset(name, DATA, train=False)
    assert (len(tr), len(te), tr.shape, tr.c) == (n_train, n_test, shape, 10)
    assert tr.x.dtype == torch.uint8 and tr.x.float().mean() > 10

def test_cifar10_binary_matches_the_official_statistics():
    tr = load_dataset('cifar10', DATA)
    assert tr.classes == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    assert torch.bincount(tr.y).tolist() == [5000]*10
    mean, std = tr.stats()
    assert np.allclose(mean, (0.4914, 0.4822, 0.4465), atol=1e-4) and np.allclose(std, (0.2470, 0.2435, 0.2616), atol=1e-4)

def test_usps_both_splits_from_the_h5_file_only():
    tr, te = load_dataset('usps', DATA, train=True), load_dataset('usps', DATA, train=False)
    assert torch.bincount(tr.y).tolist() == [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
    assert tr.files == te.files == [str(Path(DATA)/'USPS'/'usps.h5')]     # never the LIBSVM file for one split

def test_usps_libsvm_when_no_h5(tmp_path):
    os.symlink(Path(DATA).resolve()/'usps.t.bz2', tmp_path/'usps.t.bz2')
    te = load_dataset('usps', tmp_path, train=False)
    assert (len(te), te.shape, te.files) == (2007, (1,16,16), [str(tmp_path/'usps.t.bz2')])
    with pytest.raises(FileNotFoundError, match=r"usps.*usps\.bz2 is missing.*CORSD_DATA"): load_dataset('usps', tmp_path, train=True)

def _copy_mnist(tmp_path, n=None):
    raw = tmp_path/'MNIST'/'raw'; raw.mkdir(parents=True)
    for f in ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'): shutil.copy(Path(DATA)/'MNIST'/'raw'/f, raw/f)
    return raw

def test_truncated_mnist_names_the_file(tmp_path):
    raw = _copy_mnist(tmp_path)
    f = raw/'t10k-images-idx3-ubyte'
    f.write_bytes(f.read_bytes()[:-784*10])
    with pytest.raises(DataFileError, match=r"t10k-images-idx3-ubyte: truncated: the header gives 10000×28×28"): load_dataset('mnist', tmp_path, train=False)

def test_bad_mnist_labels(tmp_path):
    raw = _copy_mnist(tmp_path)
    f = raw/'t10k-labels-idx1-ubyte'
    b = bytearray(f.read_bytes()); b[8+17] = 200; f.write_bytes(bytes(b))
    with pytest.raises(DataFileError, match=r"t10k-labels-idx1-ubyte: 1 labels outside \[0, 10\).*200 at index 17"):
        load_dataset('mnist', tmp_path, train=False)
    b[3] = 3; f.write_bytes(bytes(b))                                           # a header claiming 3 dimensions
    with pytest.raises(DataFileError, match='t10k-labels-idx1-ubyte'): load_dataset('mnist', tmp_path, train=False)

def test_corrupt_cifar_record_length(tmp_path):
    d = tmp_path/'cifar-10-batches-bin'; d.mkdir()
    shutil.copy(Path(DATA)/'cifar-10-batches-bin'/'batches.meta.txt', d)
    (d/'test_batch.bin').write_bytes((Path(DATA)/'cifar-10-batches-bin'/'test_batch.bin').read_bytes()[:-100])
    with pytest.raises(DataFileError, match=r"test_batch.bin: 30,729,900 bytes; a CIFAR-10 batch holds 10,000 records of 3,073 bytes"):
        load_dataset('cifar10', tmp_path, train=False)

def test_cifar_python_version_runs_no_code(tmp_path):
    d = tmp_path/'cifar-10-batches-py'; d.mkdir()
    class Payload:
        def __reduce__(self): return (os.system, (f'touch {tmp_path/"pwned"}',))
    with open(d/'batches.meta', 'wb') as f: pickle.dump({'label_names': Payload()}, f)
    with pytest.raises(DataFileError, match='refusing to load'): load_dataset('cifar10', tmp_path, train=False)
    assert not (tmp_path/'pwned').exists()

def test_corrupt_usps_h5(tmp_path):
    (tmp_path/'USPS').mkdir()
    (tmp_path/'USPS'/'usps.h5').write_bytes((Path(DATA)/'USPS'/'usps.h5').read_bytes()[:100_000])
    with pytest.raises(DataFileError, match=r'usps.h5: not a readable HDF5 file'): load_dataset('usps', tmp_path, train=True)

def test_usps_h5_labels_checked(tmp_path):
    import h5py
    (tmp_path/'USPS').mkdir()
    with h5py.File(tmp_path/'USPS'/'usps.h5', 'w') as f:
        f['test/data'] = np.zeros((3, 256), np.float32); f['test/target'] = np.array([0, 10, 2])
    with pytest.raises(DataFileError, match=r"'test/target' labels outside \[0, 10\)"): load_dataset('usps', tmp_path, train=False)
    with pytest.raises(DataFileError, match=r"no 'train/data'"): load_dataset('usps', tmp_path, train=True)

def test_empty_split_refused(tmp_path):
    raw = tmp_path/'MNIST'/'raw'; raw.mkdir(parents=True)
    (raw/'t10k-images-idx3-ubyte').write_bytes(bytes([0,0,8,3]) + np.array([0,28,28], '>u4').tobytes())
    (raw/'t10k-labels-idx1-ubyte').write_bytes(bytes([0,0,8,1]) + np.array([0], '>u4').tobytes())
    with pytest.raises(DataFileError, match='holds no images'): load_dataset('mnist', tmp_path, train=False)

def test_empty_corsd_data_is_an_error(monkeypatch):
    monkeypatch.setenv('CORSD_DATA', '')
    with pytest.raises(ValueError, match='CORSD_DATA is an empty string'): load_dataset('mnist')
    with pytest.raises(ValueError, match='root= is an empty string'): data_root('')

def test_wrong_path_error_names_everything(tmp_path, monkeypatch):
    monkeypatch.setenv('CORSD_DATA', str(tmp_path))
    with pytest.raises(FileNotFoundError) as e: load_dataset('fashion_mnist')
    msg = str(e.value)
    for part in ['fashion_mnist', str(tmp_path), 'FashionMNIST/raw/train-images-idx3-ubyte', 'CORSD_DATA']: assert part in msg

def test_no_root_and_no_env(monkeypatch):
    monkeypatch.delenv('CORSD_DATA')
    with pytest.raises(FileNotFoundError, match='CORSD_DATA'): data_root()

def test_empty_sets_refused_where_built():
    tr, va = digits(16).split(0.2)
    with pytest.raises(ValueError, match='the training set .* is empty'): image_dls(tr.subset([]), va, device='cpu')
    with pytest.raises(ValueError, match='the validation set .* is empty'): image_dls(tr, va.subset([]), device='cpu')
    with pytest.raises(ValueError, match=r'second \(50%\) part is empty'): tr.subset([0]).split(0.5)
    with pytest.raises(ValueError, match='the target set is empty'): check_nonempty(va.subset([]), 'the target set')
    dls = image_dls(tr, va, device='cpu')
    dls.valid.dataset = va.subset([])
    with pytest.raises(ValueError, match=r'corsd_learner: the validation set \(dls.valid_ds\) is empty'): check_dls_nonempty(dls, 'corsd_learner')

def test_dataset_dls_balanced_subset():
    dls = dataset_dls('mnist', DATA, n_per_class=30, bs=50, device='cpu')
    assert len(dls.train_ds) == 300 and torch.bincount(dls.train_ds.y).tolist() == [30]*10
    assert len(dls.valid_ds) == 10000
    x, y = dls.one_batch()
    assert x.shape == (50,1,28,28) and 0 <= x.min() and x.max() <= 1

@pytest.mark.parametrize('source,target,n_adapt,n_eval', [('mnist', 'usps', 7291, 2007), ('usps', 'mnist', 60000, 10000)])
def test_domain_pair_uses_the_target_train_split(source, target, n_adapt, n_eval):
    p = domain_pair(source, target, size=16, n_per_class=10)
    assert p.source_train.shape == p.target_adapt.shape == (1,16,16)
    assert (len(p.target_adapt), len(p.target_eval)) == (n_adapt, n_eval)
    assert 'divided' not in p.protocol and ('USPS/usps.h5' if target == 'usps' else 'MNIST/raw/train-images-idx3-ubyte') in p.protocol

def test_domain_pair_halves_only_without_a_train_split(tmp_path):
    for f in ('MNIST', 'usps.t.bz2'): os.symlink(Path(DATA).resolve()/f, tmp_path/f)
    p = domain_pair('mnist', 'usps', size=28, n_per_class=10, root=tmp_path)
    assert len(p.target_adapt) + len(p.target_eval) == 2007 and 'train split not found' in p.protocol and 'usps.t.bz2' in p.protocol
    # halves are disjoint: no image of the adaptation half appears in the evaluation half
    a = {bytes(x.numpy()) for x in p.target_adapt.x}; b = {bytes(x.numpy()) for x in p.target_eval.x}
    assert len(a & b) < 5   # USPS has a few duplicate images; the split itself is by index
