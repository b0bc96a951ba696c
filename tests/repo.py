"""The repository's root folder, for tests that run its scripts, notebooks and README."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
