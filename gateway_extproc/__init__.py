"""gateway-extproc: an AI gateway built from Envoy and a Python ext_proc."""
