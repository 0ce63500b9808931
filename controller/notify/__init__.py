"""Alert receivers (one module each) and the dispatcher that delivers to them off the rollback path."""
