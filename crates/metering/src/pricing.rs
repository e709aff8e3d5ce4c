//! Pricing: unit prices per meter, the hourly cost of a dedicated table and
//! of a silo instance, and each tier's monthly price, from a TOML file
//! (`TENANTMESH_PRICING_FILE`) or the built-in example (`pricing.toml` in
//! this crate). [`Pricing::cost`] turns a tenant's usage into its cost and
//! margin.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// The built-in pricing file.
pub const DEFAULT_PRICING_TOML: &str = include_str!("../pricing.toml");

/// Hours in a month, for prorating monthly prices.
pub const HOURS_PER_MONTH: f64 = 730.0;

/// A dedicated resource's item name in a cost.
pub const DEDICATED_TABLE: &str = "dedicated_table";
pub const SILO_INSTANCE: &str = "silo_instance";
/// The item of exports kept (offboardings', restores into an export):
/// their GB (10^9 bytes) times the hours they were kept.
pub const EXPORT_GB_HOURS: &str = "export_gb_hours";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    currency: String,
    #[serde(default)]
    meters: BTreeMap<String, f64>,
    resources: Resources,
    #[serde(default)]
    tiers: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resources {
    dedicated_table: f64,
    silo_instance: f64,
    /// Per GB-hour of exports kept (0 when the file names no price).
    #[serde(default)]
    export_gb_hour: f64,
}

/// Prices in effect.
#[derive(Debug, Clone)]
pub struct Pricing {
    file: File,
}

#[derive(Debug, thiserror::Error)]
#[error("pricing file {source_name}: {message}")]
pub struct PricingError {
    pub source_name: String,
    pub message: String,
}

/// One line of a tenant's cost.
#[derive(Debug, Clone, PartialEq)]
pub struct CostLine {
    pub item: String,
    pub quantity: f64,
    pub unit_price: f64,
    pub cost: f64,
}

/// A tenant's cost over a period, against what its tier pays.
#[derive(Debug, Clone, PartialEq)]
pub struct Cost {
    pub lines: Vec<CostLine>,
    pub cost: f64,
    pub revenue: f64,
    pub margin: f64,
}

impl Default for Pricing {
    fn default() -> Self {
        Self::parse(DEFAULT_PRICING_TOML, "(built in)").expect("the built-in pricing file is valid")
    }
}

impl Pricing {
    /// Reads and checks a pricing file.
    pub fn load(path: &Path) -> Result<Self, PricingError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PricingError { source_name: path.display().to_string(), message: e.to_string() })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks pricing TOML; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, PricingError> {
        let err = |message: String| PricingError { source_name: source_name.to_owned(), message };
        let file: File = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        if !(1..=8).contains(&file.currency.len()) {
            return Err(err(format!("currency {:?} must be 1-8 characters", file.currency)));
        }
        let prices = file.meters.iter().chain(&file.tiers).map(|(k, v)| (k.as_str(), *v)).chain([
            (DEDICATED_TABLE, file.resources.dedicated_table),
            (SILO_INSTANCE, file.resources.silo_instance),
            (EXPORT_GB_HOURS, file.resources.export_gb_hour),
        ]);
        for (name, price) in prices {
            if !price.is_finite() || price < 0.0 {
                return Err(err(format!("{name}: the price {price} must be a number at least 0")));
            }
        }
        Ok(Self { file })
    }

    pub fn currency(&self) -> &str {
        &self.file.currency
    }

    /// The priced meters, by name.
    pub fn meters(&self) -> impl Iterator<Item = (&str, f64)> {
        self.file.meters.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// A tier's monthly price (0 for a tier the file does not name).
    pub fn tier_price(&self, tier: &str) -> f64 {
        self.file.tiers.get(tier).copied().unwrap_or_default()
    }

    /// The cost of `usage` (totals per meter) plus `dedicated` resources
    /// (name and hours held), against `tier`'s price over `hours`.
    pub fn cost(&self, usage: &BTreeMap<String, i64>, dedicated: &[(&str, f64)], tier: &str, hours: f64) -> Cost {
        let mut lines: Vec<CostLine> = self
            .meters()
            .map(|(meter, unit_price)| {
                let quantity = usage.get(meter).copied().unwrap_or_default() as f64;
                CostLine { item: meter.to_owned(), quantity, unit_price, cost: quantity * unit_price }
            })
            .collect();
        for (item, held) in dedicated {
            let unit_price = match *item {
                DEDICATED_TABLE => self.file.resources.dedicated_table,
                EXPORT_GB_HOURS => self.file.resources.export_gb_hour,
                _ => self.file.resources.silo_instance,
            };
            lines.push(CostLine { item: (*item).to_owned(), quantity: *held, unit_price, cost: held * unit_price });
        }
        let cost = lines.iter().map(|l| l.cost).sum::<f64>();
        let revenue = self.tier_price(tier) * hours / HOURS_PER_MONTH;
        Cost { lines, cost, revenue, margin: revenue - cost }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_file_prices_every_built_in_meter_and_tier() {
        let p = Pricing::default();
        for m in crate::meters::BUILT_IN.iter().filter(|m| **m != crate::schema::LATENCY) {
            // Refusals are listed (their count shows on each tenant's cost) at no charge.
            let charged = |price: f64| if *m == crate::schema::REFUSED { price == 0.0 } else { price > 0.0 };
            assert!(p.meters().any(|(name, price)| name == *m && charged(price)), "{m}");
        }
        let tiers = tenantmesh_service::tiers::Tiers::default();
        for t in tiers.names() {
            assert!(p.file.tiers.contains_key(t), "{t}");
        }
    }

    #[test]
    fn cost_is_usage_times_prices_plus_resources_against_the_tier() {
        let text = r#"
            currency = "EUR"
            [meters]
            requests = 0.5
            emails = 2.0
            [resources]
            dedicated_table = 1.0
            silo_instance = 3.0
            [tiers]
            gold = 730.0
        "#;
        let p = Pricing::parse(text, "t").unwrap();
        let usage = [("requests".to_owned(), 10), ("emails".to_owned(), 3), ("other".to_owned(), 99)].into();
        let c = p.cost(&usage, &[(DEDICATED_TABLE, 2.0), (SILO_INSTANCE, 2.0)], "gold", 2.0);
        assert_eq!(c.cost, 5.0 + 6.0 + 2.0 + 6.0);
        assert_eq!(c.revenue, 2.0);
        assert_eq!(c.margin, 2.0 - 19.0);
        assert_eq!(c.lines.len(), 4);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let base = "currency = \"USD\"\n[resources]\ndedicated_table = 1.0\nsilo_instance = 1.0\n";
        assert!(Pricing::parse(base, "t").is_ok());
        let e = Pricing::parse(&format!("{base}[meters]\nrequests = -1.0\n"), "t").unwrap_err();
        assert!(e.to_string().contains("requests"), "{e}");
        let e = Pricing::parse("currency = \"USD\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("resources"), "{e}");
        let e = Pricing::parse(&format!("{base}typo = 1\n"), "t").unwrap_err();
        assert!(e.to_string().contains("typo"), "{e}");
    }
}
