"""cpi-proxy: call SAP Cloud Integration iFlows with the caller's XSUAA identity.

The request pipeline is route -> authenticate -> authorize -> exchange -> forward; each stage
lives in its own module (routes, auth, exchange, forward) and `app` wires them together.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
