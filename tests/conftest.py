import sys, os
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault('CORSD_DATA', str(Path(__file__).resolve().parents[2]/'shared'/'data'))
