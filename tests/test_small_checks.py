"Small inputs that were taken silently or failed raw (issue 38, item 6): each is now a clear error naming the problem"
import pytest, torch
from corsd_suite.data import digits_dls, digits, TensorDL, image_dls
from corsd_suite.models import get_model, zoo_learner, lenet5, dtn
from corsd_suite.admm import Target, admm_prune, magnitude_prune, lenet5_targets
from corsd_suite.corsd import corsd_learner, exit_accuracies, multi_exit
from corsd_suite.calibrator import calibrator_learner
from corsd_suite.reverse_adversarial import quantize_int8

def test_target_bits_must_be_an_integer():
    with pytest.raises(ValueError, match='bits must be an integer >= 1; got True'): Target(bits=True)
    with pytest.raises(ValueError, match="got '4'"): Target(bits='4')
    assert Target(bits=4).bits == 4

def test_n_triplets_zero_is_refused():
    with pytest.raises(ValueError, match='n_triplets must be an integer in \\[1, inf\\], got 0'): corsd_learner(digits_dls(16, device='cpu'), 'resnet8', n_triplets=0)

@pytest.mark.parametrize('call, name', [(lambda l: admm_prune(l, lenet5_targets(), admm_epochs=-1), 'admm_epochs'),
                                        (lambda l: admm_prune(l, lenet5_targets(), retrain_epochs=1.5), 'retrain_epochs'),
                                        (lambda l: magnitude_prune(l, lenet5_targets(), epochs=-1), 'epochs')])
def test_negative_epochs_are_refused(call, name):
    learn = zoo_learner(digits_dls(16, device='cpu'), 'lenet5')
    w = learn.model.head[1].weight.detach().clone()
    with pytest.raises(ValueError, match=f'{name} must be an integer'): call(learn)
    assert torch.equal(w, learn.model.head[1].weight)            # refused before anything changed

@pytest.mark.parametrize('width, msg', [(-1, 'width must be a finite number in \\(0, inf\\], got -1'), (0., 'got 0.0'),
                                        (float('nan'), 'got nan'), (0.01, 'without channels: use a larger width')])
def test_bad_width(width, msg):
    with pytest.raises(ValueError, match=msg): get_model('resnet8', width=width)

def test_quantize_int8_needs_calibration_images():
    m = lenet5(size=16).eval()
    with pytest.raises(ValueError, match='calib_x is empty'): quantize_int8(m, torch.zeros(0, 1, 16, 16))

def test_exit_accuracies_on_an_empty_loader():
    net = multi_exit(get_model('resnet8', n_in=1, width=0.25), 1, 16, exits=True)
    with pytest.raises(ValueError, match='exit_accuracies got no images'): exit_accuracies(net, [])

def test_calibrator_learner_needs_a_target_loader():
    dls = digits_dls(16, device='cpu')
    clf = dtn(1, 10, dls.stats, width=0.25, size=16).eval()
    with pytest.raises(ValueError, match='target DataLoader must be a DataLoader of images, got NoneType'): calibrator_learner(dls, clf, None)
