"Every public function, class and callback parameter is documented in fastai's docments style (a comment after it)"
import importlib, inspect, pkgutil
import corsd_suite
from fastcore.docments import docments

SKIP = {'self', 'cls', 'args', 'kwargs'}

def public_api():
    "(module name, name, object) for every function and class in the `__all__` of every submodule"
    for mi in pkgutil.iter_modules(corsd_suite.__path__):
        if mi.name.startswith('_'): continue
        mod = importlib.import_module(f'corsd_suite.{mi.name}')
        for name in getattr(mod, '__all__', []):
            o = getattr(mod, name)
            if (inspect.isfunction(o) or inspect.isclass(o)) and getattr(o, '__module__', '').startswith('corsd_suite'):
                yield mi.name, name, o

def _params(o):
    "The parameters of `o` (a class: its `__init__`) that a user passes, without *args/**kwargs"
    f = o.__init__ if inspect.isclass(o) else o
    if inspect.isclass(o) and f is object.__init__: return {}, f
    try: sig = inspect.signature(f)
    except (TypeError, ValueError): return {}, f
    return {k: p for k, p in sig.parameters.items() if k not in SKIP and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}, f

def undocumented():
    out = []
    for mod, name, o in public_api():
        ps, f = _params(o)
        if not ps: continue
        try: docs = docments(f, full=True)
        except Exception: docs = {}
        out += [f'{mod}.{name}({k})' for k in ps if not (docs.get(k) or {}).get('docment')]
    return out

def test_public_api_found():
    assert sum(1 for _ in public_api()) > 50

def test_every_public_parameter_documented():
    missing = undocumented()
    assert not missing, f'{len(missing)} public parameters without a docments comment: ' + ', '.join(missing)

def test_docstrings_readable_in_help():
    "No raw LaTeX in docstrings: `help()` shows them as plain text (the maths belongs in the notebook prose)"
    import re
    bad = [f'{mod}.{name}' for mod, name, o in public_api()
           if re.search(r'\$[^$\n]+\$|\\(frac|sum|mathbf|mathcal|lambda|alpha|beta|gamma|rho|left|right|cdot|operatorname)\b', inspect.getdoc(o) or '')]
    assert not bad, f'docstrings with LaTeX: {bad}'
