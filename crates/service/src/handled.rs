//! What a handler did, as it reports it to the layers around it: the one
//! value a handler puts in its response's extensions. Admission charges
//! its [`Handled::cost`] (for RPCs whose policy charges by units), metering
//! counts its [`Handled::usage`] (for metered RPCs). No handler wraps
//! itself to be charged or metered.

use crate::limits::Cost;
use crate::metering::Usage;

/// What a call read, wrote and returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handled {
    /// Units and bytes, for the tenant's metered usage.
    pub usage: Usage,
    /// Tokens of the tenant's rate it cost in all (one of them taken at
    /// admission).
    pub cost: Cost,
    /// Answered by another instance this one forwarded the call to (a silo
    /// tenant's): that instance counts the request in its own metrics, so
    /// this one does not count it again.
    pub forwarded: bool,
}

impl Handled {
    /// `response`, reporting what its call did.
    pub fn report<T>(self, mut response: tonic::Response<T>) -> tonic::Response<T> {
        response.extensions_mut().insert(self);
        response
    }

    /// What the call of `response` reported, if it did.
    pub fn of<B>(response: &http::Response<B>) -> Option<&Handled> {
        response.extensions().get::<Handled>()
    }
}
