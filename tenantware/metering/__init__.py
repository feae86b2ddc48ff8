"""Metering: what a request cost and where that is written down.

Billing rules and exact prices, the usage tap on upstream answers, the durable ledger and its
writer, reports, the Prometheus metrics and log lines fed from records, and the usage routes.
Importing this package loads none of them; import the submodule you need.
"""
