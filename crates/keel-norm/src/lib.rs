//! keel-norm
