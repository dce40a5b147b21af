"""The data readers' bounded reading (issue 38): sizes a file declares are checked against the file and `MAX_DATA_BYTES`
before anything is allocated, dtypes and shapes on read, and the CIFAR unpickler builds arrays only, changing nothing in
the process. Every crafted file is small (1 TB files are sparse: no disk used) and lives in tmp_path."""
import pickle, struct, tracemalloc
from pathlib import Path
import numpy as np, pytest, torch
import corsd_suite.data as data
from corsd_suite.data import load_dataset, DataFileError

TB = 10**12
NAMES = 'airplane automobile bird cat deer dog frog horse ship truck'.split()

def idx_bytes(shape, payload=b''):
    "An idx file of unsigned bytes: magic, the sizes `shape` declares, then `payload`"
    return bytes([0, 0, 8, len(shape)]) + np.array(shape, '>u4').tobytes() + payload

def mnist(tmp_path, images:bytes, labels:bytes):
    raw = tmp_path/'MNIST'/'raw'; raw.mkdir(parents=True)
    (raw/'t10k-images-idx3-ubyte').write_bytes(images); (raw/'t10k-labels-idx1-ubyte').write_bytes(labels)
    return raw

def refused(fn, *match, peak_mb=16):
    "`fn()` raises a `DataFileError` whose message holds every `match`, having traced less than `peak_mb` MB at its peak"
    tracemalloc.start()
    try:
        with pytest.raises(DataFileError) as e: fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally: tracemalloc.stop()
    for m in match: assert m in str(e.value), str(e.value)
    assert peak < peak_mb * 2**20, f"{peak:,} bytes allocated before refusing"
    return str(e.value)

def sparse(path:Path, size:int):
    "A file of `size` bytes that uses no disk (a hole)"
    with open(path, 'wb') as f: f.truncate(size)

# ------------------------------------------------------------------------------------------------------------- idx
def test_idx_header_declaring_1tb(tmp_path):
    "A 20-byte idx file declaring 10⁶×10³×10³ bytes is refused by the cap, naming it"
    mnist(tmp_path, idx_bytes((10**6, 1000, 1000)), idx_bytes((1,), b'\0'))
    refused(lambda: load_dataset('mnist', tmp_path, train=False), 't10k-images-idx3-ubyte', '1,000,000,000,000 bytes', 'MAX_DATA_BYTES')

def test_idx_1tb_file_is_not_read(tmp_path):
    "An idx file that really is 1 TB (sparse) is refused from its header and size, without reading it"
    raw = mnist(tmp_path, b'', idx_bytes((1,), b'\0'))
    f = raw/'t10k-images-idx3-ubyte'
    sparse(f, 16 + TB)                                                     # its header says exactly this size
    with open(f, 'r+b') as h: h.write(idx_bytes((10**6, 1000, 1000)))
    refused(lambda: load_dataset('mnist', tmp_path, train=False), 'MAX_DATA_BYTES')

def test_idx_cap_is_the_module_constant(tmp_path, monkeypatch):
    "A valid file over `MAX_DATA_BYTES` is refused; at the default the same file loads"
    imgs = np.arange(5*28*28, dtype=np.uint8).tobytes()
    mnist(tmp_path, idx_bytes((5, 28, 28), imgs), idx_bytes((5,), bytes([0, 1, 2, 3, 4])))
    assert load_dataset('mnist', tmp_path, train=False).x.flatten().numpy().tobytes() == imgs
    monkeypatch.setattr(data, 'MAX_DATA_BYTES', 1000)
    refused(lambda: load_dataset('mnist', tmp_path, train=False), '3,920 bytes, more than MAX_DATA_BYTES = 1,000')

@pytest.mark.parametrize('rows,cols', [(0, 0), (1, 784), (28, 0)])
def test_idx_images_must_be_square_and_nonempty(tmp_path, rows, cols):
    "0×0 or 1×784 images were accepted (training then failed raw): refused, naming the file and the sides"
    mnist(tmp_path, idx_bytes((2, rows, cols), bytes(2*rows*cols)), idx_bytes((2,), b'\0\1'))
    refused(lambda: load_dataset('mnist', tmp_path, train=False), 't10k-images-idx3-ubyte', f'images of {rows}×{cols} pixels')

# -------------------------------------------------------------------------------------------------------- USPS h5
def usps_h5(tmp_path, data=None, target=None, **kw):
    "USPS/usps.h5 with a test split: `data` and `target` arrays, or (without them) datasets declared by `kw`, never written"
    import h5py
    (tmp_path/'USPS').mkdir()
    with h5py.File(tmp_path/'USPS'/'usps.h5', 'w') as f:
        if data is None:
            d = f.create_dataset('test/data', **kw)
            f.create_dataset('test/target', shape=d.shape[:1], dtype='i4', chunks=d.chunks and d.chunks[:1], compression=d.compression)
        else: f['test/data'] = data; f['test/target'] = np.zeros(len(data), np.int32) if target is None else target
    return tmp_path/'USPS'/'usps.h5'

def test_h5_declaring_1tb(tmp_path):
    "A small file declaring a 1 TB gzip dataset (its chunks never written) is refused before h5py reads it"
    p = usps_h5(tmp_path, shape=(TB // 1024, 256), dtype='f4', chunks=(64, 256), compression='gzip')
    assert p.stat().st_size < 100_000
    refused(lambda: load_dataset('usps', tmp_path, train=False), 'usps.h5', "'test/data'", '1,000,000,000,000 bytes', 'MAX_DATA_BYTES')

@pytest.mark.parametrize('compression', [None, 'gzip'])
def test_h5_declaring_more_than_the_file_holds(tmp_path, compression):
    "The issue's bomb, scaled down: a few-kB file declaring 64 MiB of (never written) pixels, under the cap, is refused"
    p = usps_h5(tmp_path, shape=(65536, 256), dtype='f4', compression=compression, chunks=(64, 256) if compression else None)
    msg = refused(lambda: load_dataset('usps', tmp_path, train=False), "'test/data'", '67,108,864 bytes', f'{p.stat().st_size:,}-byte file')
    assert ('1100×' in msg) == bool(compression)

def test_h5_cap_is_the_module_constant(tmp_path, monkeypatch):
    usps_h5(tmp_path, np.full((3, 256), 0.5, np.float32), np.array([0, 1, 2]))
    assert load_dataset('usps', tmp_path, train=False).y.tolist() == [0, 1, 2]
    monkeypatch.setattr(data, 'MAX_DATA_BYTES', 1000)
    refused(lambda: load_dataset('usps', tmp_path, train=False), 'MAX_DATA_BYTES = 1,000')

@pytest.mark.parametrize('what,data_,target,match', [
    ('complex pixels', np.full((3, 256), 0.5, np.complex64), None, "'test/data' holds complex64"),
    ('integer pixels', np.ones((3, 256), np.uint8), None, "'test/data' holds uint8; expected real floating-point"),
    ('text labels', np.zeros((3, 256), np.float32), np.array([b'a', b'b', b'c']), "'test/target' holds |S1; expected integer labels"),
    ('fewer labels', np.zeros((3, 256), np.float32), np.array([0, 1]), "'test/target' has shape (2,): not one label for each of the 3 images")])
def test_h5_dtypes_and_shapes(tmp_path, what, data_, target, match):
    "Complex (or integer) pixels and non-integer labels were accepted or failed raw: each is a DataFileError"
    usps_h5(tmp_path, data_, target)
    refused(lambda: load_dataset('usps', tmp_path, train=False), 'usps.h5', match)

# ---------------------------------------------------------------------------------------------------- CIFAR binary
def cifar_bin(tmp_path):
    d = tmp_path/'cifar-10-batches-bin'; d.mkdir()
    (d/'batches.meta.txt').write_text('\n'.join(NAMES) + '\n')
    return d

def test_cifar_bin_1tb_file_is_not_read(tmp_path):
    "CIFAR's binary files have no header: a 1 TB (sparse) batch is refused from its size alone, before it is read"
    d = cifar_bin(tmp_path); sparse(d/'test_batch.bin', TB)
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'test_batch.bin: 1,000,000,000,000 bytes; a CIFAR-10 batch holds')

def test_cifar_bin_huge_class_names_file(tmp_path):
    d = cifar_bin(tmp_path); sparse(d/'batches.meta.txt', TB)
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'batches.meta.txt: 1,000,000,000,000 bytes')

# ---------------------------------------------------------------------------------------------------- CIFAR pickle
def G(module, name): return b'c' + f'{module}\n{name}\n'.encode()          # GLOBAL
def U(s): b = s.encode(); return b'X' + struct.pack('<I', len(b)) + b      # BINUNICODE
def L(n): b = n.to_bytes((n.bit_length() + 8) // 8, 'little', signed=True); return b'\x8a' + bytes([len(b)]) + b   # LONG1
RECON = G('numpy._core.multiarray', '_reconstruct') + G('numpy', 'ndarray')
def reconstruct(n, dtype='B'): return RECON + L(n) + b'\x85' + U(dtype) + b'\x87R'   # _reconstruct(ndarray, (n,), dtype)
def entry(key, value:bytes): return U(key) + value + b's'                  # SETITEM on the dict below
def a_dict(*entries): return b'\x80\x02}' + b''.join(entries) + b'.'       # PROTO 2, EMPTY_DICT, entries, STOP

def cifar_py(tmp_path, batch:bytes|dict|None=None, meta:bytes|object=None):
    "cifar-10-batches-py with a test batch and batches.meta: bytes written as they are, anything else pickled"
    d = tmp_path/'cifar-10-batches-py'; d.mkdir(exist_ok=True)
    for name, v in [('batches.meta', {'label_names': NAMES} if meta is None else meta),
                    ('test_batch', {'data': np.zeros((10_000, 3072), np.uint8), 'labels': [0]*10_000} if batch is None else batch)]:
        (d/name).write_bytes(v if isinstance(v, bytes) else pickle.dumps(v, protocol=2))
    return d

def test_cifar_pickle_loads(tmp_path):
    "The baseline the other pickle tests change one thing of: `cifar_py`'s default files load"
    cifar_py(tmp_path)
    ds = load_dataset('cifar10', tmp_path, train=False)
    assert (len(ds), ds.classes, ds.x.dtype, int(ds.x.sum())) == (10_000, NAMES, torch.uint8, 0)

@pytest.mark.parametrize('n,match', [(TB, 'MAX_DATA_BYTES'), (10**8, 'bytes left to this file')])
def test_cifar_pickle_reconstruct_1tb(tmp_path, n, match):
    "`_reconstruct(ndarray, (n,), 'B')` used to allocate n bytes (raw MemoryError at 1 TB): refused from the declared size"
    cifar_py(tmp_path, a_dict(entry('data', reconstruct(n)), entry('labels', b']')))
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'test_batch', f'{n:,} bytes', match)

def test_cifar_pickle_many_small_arrays(tmp_path):
    "Two hundred 10 MB arrays from one memoised call: the bytes built add up against the file's budget"
    many = b'(' + reconstruct(10**7) + b'q\x00' + b'h\x00' * 199 + b'l'      # MARK, array, BINPUT 0, BINGET 0 ×199, LIST
    cifar_py(tmp_path, a_dict(entry('junk', many), entry('data', b'N')))
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'test_batch', 'bytes left to this file')

def test_cifar_pickle_ndarray_called_directly(tmp_path):
    "`numpy.ndarray((10**12,), 'B')` through REDUCE would allocate too: the class is not handed out as a callable"
    cifar_py(tmp_path, a_dict(entry('data', G('numpy', 'ndarray') + L(TB) + b'\x85' + U('B') + b'\x86R')))
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'test_batch: not a readable CIFAR python batch')

def test_cifar_pickle_object_array(tmp_path):
    "`_reconstruct(ndarray, shape, 'O')` slipped past the object check (labels then failed raw): refused"
    data = pickle.dumps(np.zeros((10_000, 3072), np.uint8), protocol=2)[2:-1]   # the array's opcodes alone
    cifar_py(tmp_path, a_dict(entry('data', data), entry('labels', reconstruct(10_000, 'O'))))
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'test_batch', "refusing an array of dtype('O')", peak_mb=200)

def test_cifar_meta_not_a_dict(tmp_path):
    "A batches.meta that unpickles to a list gave an AttributeError: a DataFileError naming the file"
    cifar_py(tmp_path, meta=NAMES)
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'batches.meta: holds a list; a CIFAR-10 python file holds a dict')

def test_cifar_labels_not_numbers(tmp_path):
    cifar_py(tmp_path, {'data': np.zeros((10_000, 3072), np.uint8), 'labels': ['cat'] * 10_000})
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'test_batch: labels are <U3, not integers', peak_mb=200)

def package_state():
    "Every attribute of every function and class of corsd_suite.data (names, docs, dicts, qualnames)"
    out = {}
    for k, v in vars(data).items():
        if callable(v) and getattr(v, '__module__', None) == data.__name__:
            out[k] = (v.__name__, v.__qualname__, v.__doc__, v.__module__, dict(vars(v)) if hasattr(v, '__dict__') else None)
    return out

@pytest.mark.parametrize('target', [('_codecs', 'encode'), ('numpy', 'dtype'), ('numpy', 'ndarray'),
                                    ('numpy._core.multiarray', '_reconstruct'), ('numpy.core.multiarray', '_reconstruct')])
def test_cifar_pickle_cannot_change_the_process(tmp_path, target):
    "BUILD on what `find_class` hands out renamed the package's own `_codecs_encode` (and could set any attribute): refused, nothing changes"
    attrs = {'__qualname__': 'pwned', '__name__': 'pwned', '__doc__': 'pwned', '__module__': 'pwned', 'pwned': 1}
    state = b'N}' + b''.join(U(k) + (U(v) if isinstance(v, str) else b'K\x01') + b's' for k, v in attrs.items()) + b'\x86'
    evil = b'\x80\x02' + G(*target) + state + b'b.'                          # GLOBAL; (None, {attrs}); BUILD; STOP
    cifar_py(tmp_path, meta=evil)
    before, np_before = package_state(), (np.ndarray.__qualname__, np.dtype.__qualname__, np.dtype('u1').str)
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'batches.meta')
    assert package_state() == before
    assert (np.ndarray.__qualname__, np.dtype.__qualname__, np.dtype('u1').str) == np_before
    import corsd_suite
    assert not any(getattr(v, 'pwned', None) == 1 for m in (data, corsd_suite) for v in vars(m).values())

def test_cifar_pickle_build_and_setitem_only_on_what_it_built(tmp_path):
    "BUILD on an array with a state that is not numpy's, SETITEM on a list: refused"
    cifar_py(tmp_path, meta=b'\x80\x02' + reconstruct(0) + b'}b.')
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), "refusing an array state that is not numpy's")
    cifar_py(tmp_path, meta=b'\x80\x02]' + U('k') + U('v') + b's.')
    refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'refusing SETITEM on a list')

def test_cifar_pickle_extension_codes_refused(tmp_path):
    "An EXT opcode resolves a registered name through copyreg's process-wide cache, which would keep what it found: refused"
    import copyreg
    copyreg.add_extension('numpy', 'dtype', 0x7ffe)
    try:
        cache = dict(copyreg._extension_cache)
        cifar_py(tmp_path, meta=b'\x80\x02\x83\xfe\x7f.')                    # EXT2 0x7ffe
        refused(lambda: load_dataset('cifar10', tmp_path, train=False), 'batches.meta', 'extension code')
        assert copyreg._extension_cache == cache
    finally: copyreg.remove_extension('numpy', 'dtype', 0x7ffe)
