"""Triton Inference Server model repositories for built artifacts (`clipexport triton DIR --out REPO`).

    from clipexport.triton import TritonOptions, write_repository
    write_repository(Path("engines/ViT-B-32-none-fp32"), TritonOptions(out=Path("triton-repo")))

config.py writes config.pbtxt (needs `pip install clipexport[triton]`), python_model.py is the
Python-backend model.py copied into the repository, repository.py assembles the repository and
command.py is the click command. Importing this package stays light (no tritonclient, no numpy).
"""

from __future__ import annotations

from clipexport.triton.repository import RepositoryResult, TowerModels, TritonOptions, write_repository

__all__ = ["RepositoryResult", "TowerModels", "TritonOptions", "write_repository"]
