//! What a handler did, as it reports it to the layers around it: the one
//! value a handler puts in its response's extensions. Admission charges
//! its [`Handled::cost`] (for RPCs whose policy charges by units), metering
//! counts its [`Handled::usage`] (for metered RPCs). No handler wraps
//! itself to be charged or metered.

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

/// What a request cost, in tokens of its tenant's rate: a handler reports
/// it in [`Handled`], and admission charges the tokens beyond the one
/// taken at admission, all of them: a request larger than a burst leaves
/// its key owing, and the key's next requests wait until the debt is paid
/// at its rate. The data service reports DynamoDB's units: a read unit per
/// 4 KB read, a write unit per 1 KB written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost(pub u32);

impl Cost {
    /// Read units of `bytes` read (at least 1).
    pub fn read(bytes: usize) -> Self {
        Cost(bytes.div_ceil(4096).max(1).min(u32::MAX as usize) as u32)
    }

    /// Write units of `bytes` written (at least 1).
    pub fn write(bytes: usize) -> Self {
        Cost(bytes.div_ceil(1024).max(1).min(u32::MAX as usize) as u32)
    }
}

/// One request's usage beyond its count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub read_units: u64,
    pub write_units: u64,
    pub bytes_returned: u64,
}

impl Usage {
    /// Read units of items of these encoded sizes: one per 4 KB of each,
    /// rounded up per item (DynamoDB's rule, per item).
    pub fn read(sizes: impl IntoIterator<Item = usize>, bytes_returned: usize) -> Self {
        let read_units = sizes.into_iter().map(|s| u64::from(Cost::read(s).0)).sum();
        Self { read_units, write_units: 0, bytes_returned: bytes_returned as u64 }
    }

    /// Write units of an item of this encoded size: one per 1 KB, rounded up.
    pub fn write(size: usize, bytes_returned: usize) -> Self {
        Self { read_units: 0, write_units: u64::from(Cost::write(size).0), bytes_returned: bytes_returned as u64 }
    }
}

/// The response header in which an instance that serves one silo tenant
/// reports a call's [`Usage`] to the shared instance that forwarded it:
/// `<read units>,<write units>,<bytes returned>`. The shared instance
/// counts the call (the silo instance meters nothing) and removes the
/// header before the answer goes on.
pub const USAGE_HEADER: &str = "tenantmesh-usage";

impl Usage {
    /// The [`USAGE_HEADER`] value of this usage.
    pub fn header_value(&self) -> http::HeaderValue {
        let text = format!("{},{},{}", self.read_units, self.write_units, self.bytes_returned);
        http::HeaderValue::from_str(&text).expect("digits and commas are a header value")
    }

    /// The usage a [`USAGE_HEADER`] value reports; `None` when it is not one.
    pub fn from_header(value: &http::HeaderValue) -> Option<Self> {
        let mut parts = value.to_str().ok()?.split(',').map(|p| p.parse::<u64>().ok());
        let usage = Usage { read_units: parts.next()??, write_units: parts.next()??, bytes_returned: parts.next()?? };
        parts.next().is_none().then_some(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_goes_through_its_header_unchanged() {
        let usage = Usage { read_units: 3, write_units: 0, bytes_returned: 12_345 };
        assert_eq!(Usage::from_header(&usage.header_value()), Some(usage));
        assert_eq!(Usage::from_header(&Usage::default().header_value()), Some(Usage::default()));
        for bad in ["", "1,2", "1,2,3,4", "a,b,c", "-1,0,0", "1, 2,3"] {
            assert_eq!(Usage::from_header(&http::HeaderValue::from_static(bad)), None, "{bad:?}");
        }
    }
}
