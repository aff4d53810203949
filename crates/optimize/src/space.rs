//! The search space (docs/optimize.md): every trial is a point of the unit cube (and one choice), mapped
//! to an edit's parameters here and nowhere else.

use edit::{LayerKernel, Profile, Tent};
use serde_json::{Value, json};

use crate::tpe::Dim;
use crate::{Error, Result};

/// heretic's range of a kernel's peak weight (`max_weight`).
pub const PEAK: (f64, f64) = (0.8, 1.5);

/// heretic's ranges (1.4.0, `main.py`: "based on experiments with various models and much wider ranges"),
/// as fractions of the last layer's index: the direction index, a kernel's peak position and its width.
/// Refusal is read best a little past the middle of the stack and written by the later layers; with
/// the whole stack as the range, a third of the uniform trials went to the first layers (docs/results.md,
/// "Side by side with heretic and abliterix").
pub const INDEX_FRACTION: (f64, f64) = (0.4, 0.9);
pub const POSITION_FRACTION: (f64, f64) = (0.6, 1.0);
pub const WIDTH_FRACTION: f64 = 0.6;

/// The ranges of a model's search.
#[derive(Clone, Debug, PartialEq)]
pub struct Space {
    /// Decoder layers of the model.
    pub layers: usize,
    /// `find`'s position (from the end of the prompt) whose candidates the direction index interpolates.
    pub position: i64,
    /// The fractional direction index's range: [`INDEX_FRACTION`] of the last layer, within the usable
    /// candidates' layers.
    pub index: (f64, f64),
    /// Whether the directions are find's candidates or their projected versions, or a searched choice.
    pub projection: Projection,
}

/// The projected direction variant in the search (docs/variants.md, "Projected"; heretic's
/// `orthogonalize_direction`): each candidate without its component along the harmless mean of its site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Projection {
    /// find's candidates as they are (the search of the side by side in docs/results.md).
    #[default]
    Off,
    /// Every trial's candidates projected (heretic 1.4.0's default).
    On,
    /// A twelfth parameter, `projected`, chooses per trial.
    Search,
}

impl std::str::FromStr for Projection {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Projection, String> {
        match s {
            "off" => Ok(Projection::Off),
            "on" => Ok(Projection::On),
            "search" => Ok(Projection::Search),
            _ => Err(format!("`{s}` is not a projection: off, on or search")),
        }
    }
}

impl Projection {
    pub fn label(self) -> &'static str {
        match self {
            Projection::Off => "off",
            Projection::On => "on",
            Projection::Search => "search",
        }
    }
}

/// One trial's edit.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// heretic's `direction_index`: `normalize((1 − t) r̂_a + t r̂_b)` between the candidates entering layers
    /// `a = ⌊index⌋` and `a + 1` (`direction::derive::interpolate`).
    pub index: f64,
    pub attn: Tent,
    pub mlp: Tent,
    pub norm_preserving: bool,
    /// heretic's `direction_scope = "per layer"`: each decoder block's writers are orthogonalized against
    /// its own layer's candidate (block `l` ← the residual it writes into, `direction::derive::per_layer`),
    /// and `index` is unused.
    pub per_layer: bool,
    /// The candidates are projected ([`Projection`]).
    pub projected: bool,
}

/// The parameters, in point order; the last only where [`Projection::Search`].
pub const NAMES: [&str; 12] = [
    "direction_index",
    "attn.peak",
    "attn.position",
    "attn.min_fraction",
    "attn.width",
    "mlp.peak",
    "mlp.position",
    "mlp.min_fraction",
    "mlp.width",
    "norm_preserving",
    "direction_scope",
    "projected",
];

impl Space {
    /// The space of a model with `layers` layers whose candidates at `position` are usable from layer
    /// `first_usable` on (the residual entering layer 0 is the embedding, the same for every prompt at a
    /// post-instruction position, so its candidate is zero).
    pub fn new(layers: usize, position: i64, first_usable: usize, projection: Projection) -> Result<Space> {
        if first_usable >= layers {
            return Err(Error::Space(format!(
                "no usable candidate at position {position}: the direction index needs at least one nonzero \
                 candidate among layers 0..={}",
                layers.saturating_sub(1)
            )));
        }
        let last = (layers - 1) as f64;
        let lo = (INDEX_FRACTION.0 * last).max(first_usable as f64);
        let hi = (INDEX_FRACTION.1 * last).max(lo);
        Ok(Space { layers, position, index: (lo, hi), projection })
    }

    pub fn dims(&self) -> Vec<Dim> {
        let mut d = vec![Dim::Unit; 9];
        d.extend([Dim::Choice(2), Dim::Choice(2)]);
        if self.projection == Projection::Search {
            d.push(Dim::Choice(2));
        }
        d
    }

    /// The names of [`Space::dims`], in order.
    pub fn names(&self) -> &'static [&'static str] {
        &NAMES[..self.dims().len()]
    }

    fn last(&self) -> f64 {
        (self.layers - 1) as f64
    }

    /// The width's range: [1, L − 1] (a single layer model: [0, 0]).
    /// A kernel's peak position: [`POSITION_FRACTION`] of the last layer.
    fn position_range(&self) -> (f64, f64) {
        (POSITION_FRACTION.0 * self.last(), POSITION_FRACTION.1 * self.last())
    }

    /// A kernel's width (`min_weight_distance`): from 1 layer to [`WIDTH_FRACTION`] of the last layer.
    fn width(&self) -> (f64, f64) {
        let hi = WIDTH_FRACTION * self.last();
        (1f64.min(hi), hi.max(1f64.min(hi)))
    }

    /// Maps a point of the unit cube (and the choice) to an edit.
    pub fn params(&self, x: &[f64]) -> Params {
        let at = |u: f64, (lo, hi): (f64, f64)| lo + u * (hi - lo);
        let tent = |u: &[f64]| {
            let peak = at(u[0], PEAK);
            Tent { peak, position: at(u[1], self.position_range()), min: u[2] * peak, width: at(u[3], self.width()) }
        };
        Params {
            index: at(x[0], self.index),
            attn: tent(&x[1..5]),
            mlp: tent(&x[5..9]),
            norm_preserving: x[9] == 1.0,
            per_layer: x[10] == 1.0,
            projected: match self.projection {
                Projection::Off => false,
                Projection::On => true,
                Projection::Search => x[11] == 1.0,
            },
        }
    }

    /// As recorded in `settings.json`: a resumed search must have the same space.
    pub fn to_json(&self) -> Value {
        json!({
            "layers": self.layers,
            "position": self.position,
            "direction_index": [self.index.0, self.index.1],
            "peak": [PEAK.0, PEAK.1],
            "kernel_position": [self.position_range().0, self.position_range().1],
            "ranges": "heretic 1.4.0's: direction index 0.4-0.9, kernel peak position 0.6-1.0, width 1 to 0.6 of the last layer's index",
            "min": "min_fraction x peak, min_fraction in [0, 1]",
            "width": [self.width().0, self.width().1],
            "norm_preserving": [false, true],
            "direction_scope": ["global", "per_layer"],
            "projected": self.projection.label(),
            "parameters": self.names(),
        })
    }
}

impl Params {
    /// The edit's layer kernel (the embedding keeps weight 1).
    pub fn kernel(&self) -> LayerKernel {
        LayerKernel { attn: Some(Profile::Tent(self.attn)), mlp: Some(Profile::Tent(self.mlp)), embedding: None }
    }

    /// The kernel as the table file `edit --kernel-table` reads: one weight per layer and group.
    pub fn kernel_table(&self, layers: usize) -> Value {
        json!({
            "attn": (0..layers).map(|l| self.attn.weight(l)).collect::<Vec<_>>(),
            "mlp": (0..layers).map(|l| self.mlp.weight(l)).collect::<Vec<_>>(),
        })
    }

    /// heretic's `direction_scope`, as recorded.
    pub fn scope(&self) -> &'static str {
        if self.per_layer { "per_layer" } else { "global" }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "direction_index": self.index,
            "attn": self.attn.to_string(),
            "mlp": self.mlp.to_string(),
            "norm_preserving": self.norm_preserving,
            "direction_scope": self.scope(),
            "projected": self.projected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_map_to_the_stated_ranges() {
        // 11 layers: the last index is 10, so the direction index spans 4..9, a peak 6..10, a width 1..6.
        let s = Space::new(11, -1, 1, Projection::Off).unwrap();
        let p = s.params(&[0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert!(!p.projected);
        assert_eq!(p.index, 4.0);
        assert_eq!(p.attn, Tent { peak: 0.8, position: 6.0, min: 0.0, width: 1.0 });
        assert_eq!(p.mlp, Tent { peak: 1.5, position: 10.0, min: 1.5, width: 6.0 });
        assert!(p.norm_preserving && p.per_layer);
        assert_eq!(p.to_json()["direction_scope"], "per_layer");
        let p = s.params(&[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0]);
        assert_eq!((p.index, p.attn.position, p.attn.width, p.norm_preserving), (6.5, 8.0, 3.5, false));
        assert!(!p.per_layer);
        assert_eq!((s.dims().len(), s.names().last()), (11, Some(&"direction_scope")));
        // The projection: fixed, or a twelfth choice.
        let on = Space::new(11, -1, 1, Projection::On).unwrap();
        assert_eq!(on.dims(), s.dims());
        assert!(on.params(&[0.5; 11]).projected);
        let search = Space::new(11, -1, 1, Projection::Search).unwrap();
        assert_eq!((search.dims().len(), search.names().len(), search.dims()[11]), (12, 12, Dim::Choice(2)));
        let mut x = [0.5; 12];
        x[11] = 0.0;
        assert!(!search.params(&x).projected);
        x[11] = 1.0;
        assert!(search.params(&x).projected);
        assert_eq!(search.to_json()["projected"], "search");
        assert_eq!(search.params(&x).to_json()["projected"], true);
        assert_eq!("search".parse::<Projection>(), Ok(Projection::Search));
        assert_eq!("yes".parse::<Projection>().unwrap_err(), "`yes` is not a projection: off, on or search");
        assert!((p.attn.min - 0.575).abs() < 1e-12);
        let t = p.kernel_table(11);
        assert_eq!(t["attn"][8], 1.15);
        // The index never goes below the first usable candidate.
        assert_eq!(Space::new(11, -1, 7, Projection::Off).unwrap().index, (7.0, 9.0));
        assert_eq!(Space::new(11, -1, 10, Projection::Off).unwrap().index, (10.0, 10.0));
        assert_eq!(
            Space::new(4, -1, 4, Projection::Off).unwrap_err().to_string(),
            "no usable candidate at position -1: the direction index needs at least one nonzero candidate among \
             layers 0..=3"
        );
    }
}
