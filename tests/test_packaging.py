"What a published package owes its users: imports that print nothing, and its licence inside the wheel."
import subprocess, sys, zipfile, pkgutil
from pathlib import Path
import pytest
import corsd_suite

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.iter_modules(corsd_suite.__path__) if not m.name.startswith('_'))

@pytest.mark.parametrize('mod', MODULES)
def test_import_prints_no_warning(mod):
    "`python -W error -c 'import corsd_suite.<mod>'`: any warning raised while importing fails"
    r = subprocess.run([sys.executable, '-W', 'error', '-c', f'import corsd_suite.{mod}'], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr == '', r.stderr[-2000:]

def test_wheel_holds_licence(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w', str(tmp_path), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    whl, = tmp_path.glob('corsd_suite-*.whl')
    names = zipfile.ZipFile(whl).namelist()
    lic = [n for n in names if n.endswith('/LICENSE') and '.dist-info/' in n]
    assert lic, f"no LICENSE in {whl.name}: {names[-8:]}"
    text = zipfile.ZipFile(whl).read(lic[0]).decode()
    assert 'Apache License' in text and 'Version 2.0' in text
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
    assert 'License-Expression: Apache-2.0' in meta and 'Topic :: Scientific/Engineering :: Artificial Intelligence' in meta
