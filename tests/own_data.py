"""What a fastai user brings, for the your-own-model tests: a `DataBlock` over a folder of PNG files (written from the
embedded digits, so nothing downloads) with `aug_transforms` and fastai's `Normalize`, and torchvision / timm networks."""
import functools, tempfile
from pathlib import Path
import torch
from torch import nn
from PIL import Image
from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, get_image_files, parent_label, RandomSplitter,
                               Resize, Normalize, aug_transforms, imagenet_stats)
from corsd_suite.data import digits

SIZE = 32

@functools.lru_cache(None)
def digit_pngs(n:int=120, size:int=SIZE) -> Path:
    "A folder of `n` RGB digit PNGs, one sub-folder per class (made once per test session)"
    d = Path(tempfile.mkdtemp(prefix='digit_pngs_'))
    ds = digits(size).to_channels(3)
    for i in range(n):
        p = d/str(int(ds.y[i])); p.mkdir(exist_ok=True)
        Image.fromarray(ds.x[i].permute(1, 2, 0).numpy()).save(p/f'{i}.png')
    return d

def block_dls(norm:bool=True, bs:int=16, n:int=120, aug:bool=True, size:int=SIZE, seed:int=0):
    "fastai `DataLoaders` as a user writes them: a `DataBlock` of PNGs, `aug_transforms` and (with `norm`) `Normalize`"
    tfms = (aug_transforms(size=size, do_flip=False, max_rotate=5.) if aug else []) + ([Normalize.from_stats(*imagenet_stats)] if norm else [])
    db = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                   splitter=RandomSplitter(0.25, seed=seed), item_tfms=Resize(size), batch_tfms=tfms)
    return db.dataloaders(digit_pngs(n, size), bs=bs, device='cpu', num_workers=0)

def tv_resnet18(num_classes:int=10) -> nn.Module:
    "torchvision's ResNet-18 with the 3×3 stride-1 stem and no max-pool that small images call for"
    from torchvision.models import resnet18
    m = resnet18(num_classes=num_classes)
    m.conv1, m.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return m

def tv_mobilenet(num_classes:int=10) -> nn.Module:
    from torchvision.models import mobilenet_v3_small
    return mobilenet_v3_small(num_classes=num_classes)

def timm_model(num_classes:int=10) -> nn.Module:
    "timm's smallest ResNet (`test_resnet`, made for tests)"
    import timm
    return timm.create_model('test_resnet', num_classes=num_classes)

MODELS = dict(resnet18=tv_resnet18, mobilenet_v3_small=tv_mobilenet, timm_test_resnet=timm_model)
