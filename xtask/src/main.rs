//! keel's developer tasks (`cargo xtask <task>`).
fn main() {}
