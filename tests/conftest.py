import os
import sys

# spawned ranks import worker functions from the test modules by name
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
