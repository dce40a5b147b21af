"""A `.czip` file is read as data with bounds: declared shapes never allocate more than the model (or MAX_DECODED_BYTES), a
deep header, a relabelled dtype, NaN/Inf values and a file for another model all end in `CompressedFileError` naming the file"""
import hashlib, json, math, zlib, time
import numpy as np, pytest, torch
from corsd_suite.models import lenet5
from corsd_suite.admm import (save_compressed, load_compressed, read_compressed, export_compressed, apply_targets, Target,
                              CompressedFileError, MAX_DECODED_BYTES)

MAGIC = b'CORSDZ\x00\x01'

def parts(f):
    "(header dict, payload bytes) of a `save_compressed` file"
    data = f.read_bytes(); hl = int.from_bytes(data[8:12], 'little')
    return json.loads(zlib.decompress(data[12:12 + hl])), data[12 + hl:]

def write(f, head, payload:bytes, header_json:bytes|None=None):
    "A file of the format with `head` (its checksum made to match `payload`) or raw `header_json`"
    head = dict(head, sha256=hashlib.sha256(payload).hexdigest())
    h = zlib.compress(header_json if header_json is not None else json.dumps(head).encode(), 9)
    f.write_bytes(MAGIC + len(h).to_bytes(4, 'little') + h + payload)
    return f

@pytest.fixture
def czip(tmp_path):
    torch.manual_seed(0)
    net = lenet5(size=16)
    apply_targets(net, {'head.1': Target(rate=.95, bits=4), 'stages.1.0': Target(rate=.9)})
    return net, save_compressed(net, tmp_path/'m.czip')

def test_declared_shapes_are_bounded(czip, tmp_path):
    "A 37 GiB sparse or structured weight declared in a few bytes is refused before any allocation, with or without a model"
    net, f = czip
    head, payload = parts(f)
    for enc, extra in (('sparse', dict(index_bits=4, value_bits=4, entries=0, kept=0)), ('structured', dict(filters=0, columns=0))):
        bomb = dict(name='huge.weight', shape=[1 << 20, 10_000], dtype='float32', enc=enc, levels=None, **extra)
        g = write(tmp_path/f'{enc}.czip', dict(head, tensors=head['tensors'] + [bomb]), payload)
        assert g.stat().st_size < 100_000                         # tens of kB on disk, 40 GiB declared
        t0 = time.perf_counter()
        with pytest.raises(CompressedFileError, match=f'{enc}.czip.*MAX_DECODED_BYTES'): read_compressed(g)
        with pytest.raises(CompressedFileError, match="does not fit this architecture.*unexpected \\['huge.weight'\\]"):
            load_compressed(lenet5(size=16), g)
        assert time.perf_counter() - t0 < 2
    # a name the model has, with a larger shape: refused by the model's own shape before decoding
    big = [dict(h, shape=[500, 1 << 24], enc='sparse', levels=None, index_bits=4, value_bits=4, entries=0, kept=0)
           if h['name'] == 'head.1.weight' else h for h in head['tensors']]
    g = write(tmp_path/'grown.czip', dict(head, tensors=big), payload)
    with pytest.raises(CompressedFileError, match='head.1.weight has shape'): load_compressed(lenet5(size=16), g)
    assert MAX_DECODED_BYTES == 1 << 30

def test_header_tricks(czip, tmp_path):
    "A deeply nested header, a repeated name, a dtype relabelled int32 and NaN/Inf values: each a CompressedFileError naming the file"
    net, f = czip
    head, payload = parts(f)
    g = write(tmp_path/'deep.czip', head, payload, header_json=b'[' * 100_000 + b']' * 100_000)
    with pytest.raises(CompressedFileError, match='deep.czip'): read_compressed(g)
    g = write(tmp_path/'twice.czip', dict(head, tensors=head['tensors'] + head['tensors'][-1:]), payload)
    with pytest.raises(CompressedFileError, match='twice.czip.*repeats'): read_compressed(g)
    relabel = [dict(h, dtype='int32') if h['name'] == 'head.3.bias' else h for h in head['tensors']]
    g = write(tmp_path/'relabel.czip', dict(head, tensors=relabel), payload)
    with pytest.raises(CompressedFileError, match='head.3.bias is torch.int32 there, torch.float32 here'): load_compressed(lenet5(size=16), g)
    # NaN or Inf in the last tensor (head.3.bias, stored raw): made by hand, refused when read; the writer refuses them too
    assert head['tensors'][-1]['name'] == 'head.3.bias' and head['tensors'][-1]['enc'] == 'raw'
    for name, value in (('nan', float('nan')), ('inf', float('inf'))):
        g = write(tmp_path/f'{name}.czip', head, payload[:-4] + np.float32(value).tobytes())
        with pytest.raises(CompressedFileError, match=f'{name}.czip: head.3.bias holds NaN or infinite'): load_compressed(lenet5(size=16), g)
        m = lenet5(size=16); m.load_state_dict(net.state_dict())
        with torch.no_grad(): m.head[1].weight[0, 0] = value
        with pytest.raises(ValueError, match='head.1.weight holds NaN or infinite'): save_compressed(m, tmp_path/f'w{name}.czip')
        assert not (tmp_path/f'w{name}.czip').exists()
    back = load_compressed(lenet5(size=16), f)                 # the good file still loads, bit for bit
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())

def test_export_format_checked(czip, tmp_path):
    "An `export_compressed` file for another architecture, or holding NaN, is refused by name (not a raw torch error)"
    net, _ = czip
    f = export_compressed(net, tmp_path/'e.pth', input_shape=(1, 16, 16))
    with pytest.raises(CompressedFileError, match='e.pth does not fit this architecture.*head.1.weight has shape'):
        load_compressed(lenet5(size=28), f)
    with torch.no_grad(): net.head[1].bias[3] = float('nan')
    g = export_compressed(net, tmp_path/'n.pth', input_shape=(1, 16, 16))
    with pytest.raises(CompressedFileError, match='n.pth: head.1.bias holds NaN'): load_compressed(lenet5(size=16), g)
    back = load_compressed(lenet5(size=16), f)
    assert torch.equal(back.head[1].weight, load_compressed(lenet5(size=16), f).head[1].weight)
