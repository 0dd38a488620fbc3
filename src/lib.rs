//! keel

/// LR schedules, clipping, SGD/AdamW, loss scaling, accumulation and EMA (issue 4).
pub use keel_optim as optim;
