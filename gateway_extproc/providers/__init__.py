"""Provider translators, one module per provider kind (see base.py for the contract)."""
