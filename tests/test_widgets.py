"Tests of corsd_suite.widgets: the explorer's controls, driven programmatically, change what it draws"
import matplotlib; matplotlib.use('Agg')
import pytest, torch
from corsd_suite.core import seed_everything
from corsd_suite.data import digits_dls
from corsd_suite.models import zoo_learner
from corsd_suite.widgets import explore, Explorer, Knob, StepsPanel, SparsityPanel, PANELS, has_widget_frontend

@pytest.fixture(scope='module')
def learn():
    seed_everything(0)
    return zoo_learner(digits_dls(16, device='cpu'), 'resnet8')

def test_no_frontend_here_gives_static_figures(learn):
    "Outside a Jupyter kernel the explorer degrades to static matplotlib figures, one per panel"
    assert not has_widget_frontend()
    ex = explore(learn, n=8)
    assert ex.static and set(ex.figures) == set(ex.panels) and not ex.controls
    assert len(ex.figures['gradient steps'].subfigs) == len(StepsPanel.static)

def test_every_control_changes_the_image(learn):
    "Moving each slider/dropdown of each panel changes the PNG shown and the panel's numbers"
    ex = explore(learn, n=8, static=False)
    for title, panel in ex.panels.items():
        for name, knob in panel.params.items():
            w = ex.controls[title][name]
            before_png, before = ex.images[title].value, dict(ex.results[title])
            new = next(o for o in knob.options if o != w.value) if knob.options else (knob.hi if w.value != knob.hi else knob.lo)
            if title == 'gradient steps' and name == 'mode': ex.set(title, steps=10, eps=0.2)
            before_png = ex.images[title].value
            w.value = new                                   # as a user dragging the slider
            assert ex.values[title][name] == new
            assert ex.images[title].value != before_png, (title, name)
    r0 = ex.set('gradient steps', steps=0)
    r1 = ex.set('gradient steps', steps=10, eps=0.2, mode=StepsPanel.MODES[0])
    assert r0['linf'] == 0 and r1['linf'] > 0.1 and r1['p_true_after'] <= r1['p_true_before'] + 1e-6
    s = [ex.set('layer sparsity', sparsity=v)['kept'] for v in (0.0, 0.5, 0.9)]
    assert s[0] == 1.0 and abs(s[1] - 0.5) < 0.01 and abs(s[2] - 0.1) < 0.01

def test_sparsity_panel_restores_the_model(learn):
    "Projecting a layer for display never changes the learner's model"
    before = [p.detach().clone() for p in learn.model.parameters()]
    ex = explore(learn, n=8, static=False, panels=[SparsityPanel])
    ex.set('layer sparsity', layer=0, sparsity=0.9)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))

def test_bad_input(learn):
    x, y = learn.dls.valid.one_batch()
    with pytest.raises(ValueError, match='needs a Learner'): explore(model=learn.model)
    with pytest.raises(ValueError, match='labels'): explore(model=learn.model, x=x[:4], y=y[:3])
    with pytest.raises(ValueError, match='no explorer panel'): explore(learn, panels=[])
    with pytest.raises(ValueError, match='no control'): explore(learn, n=4, static=False).set('gradient steps', foo=1)
    with pytest.raises(ValueError, match='not one of'): Knob('c', options=['a', 'b'])
    with pytest.raises(ValueError, match='pixel-space'): explore(model=learn.model, x=x[:4]*255, y=y[:4])
    with pytest.raises(ValueError, match='N, C, H, W'): explore(model=learn.model, x=x[0], y=y[:1])

def test_panels_are_pluggable(learn):
    "A new panel registered by a module appears in the explorer; a panel whose `make` returns None does not"
    from corsd_suite.widgets import Panel, register_panel
    class Mean(Panel):
        title = 'mean'
        def __init__(self, *a):
            super().__init__(*a); self.params = dict(image=Knob(0, 0, len(self.x)-1, 1))
        def draw(self, fig, image=0):
            fig.subplots().imshow(self.x[image, 0].cpu().numpy()); return dict(mean=float(self.x[image].mean()))
    class Never(Panel):
        @classmethod
        def make(cls, *a): return None
    ex = explore(learn, n=4, static=False, panels=[Mean, Never])
    assert list(ex.panels) == ['mean']
    assert ex.set('mean', image=1)['mean'] != ex.set('mean', image=0)['mean']
    n = len(PANELS); register_panel(StepsPanel); assert len(PANELS) == n   # registering twice is a no-op
