"""Meta-test protocol, metrics (IQM, stratified-bootstrap CIs), summary and report."""
