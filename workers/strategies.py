"""The registry of parallel strategies, by the name --parallel takes."""
from workers.data_parallel import DataParallel
from workers.hybrid import Hybrid

STRATEGIES = {cls.name: cls for cls in (Hybrid, DataParallel)}
