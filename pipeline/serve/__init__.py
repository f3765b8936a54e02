"""`vae serve`: the ONNX decoder over HTTP (app.py), its protocol, session and metrics; on
Ray Serve too (ray_serve.py)."""
