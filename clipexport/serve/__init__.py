"""`clipexport serve DIR`: an artifact behind Triton's own server (the tritonserver that the
nvidia-pytriton wheel bundles), over HTTP and gRPC, with Triton's dynamic batching.

repository.py writes the model repository the server runs (two Python-backend models, model.py
here), command.py is the click command and its signal handling; the server process itself is
started by clipexport.triton.server. Importing this package stays light.
"""

from __future__ import annotations

from clipexport.serve.repository import ServeOptions, ServeRepository, write_serve_repository

__all__ = ["ServeOptions", "ServeRepository", "write_serve_repository"]
