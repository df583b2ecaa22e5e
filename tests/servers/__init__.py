"""Local servers that tests start so the real client code can talk to them (no fake model in the product)."""
