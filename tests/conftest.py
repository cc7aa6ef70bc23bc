import os
import sys

# Tests import the top-level modules (models, diffusion, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub: nothing can be downloaded here
