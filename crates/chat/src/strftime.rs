//! `strftime_now(format)`, the clock helper transformers gives chat templates (Llama 3.1+
//! templates print "Today Date: 26 Jul 2024" with it).
//!
//! Python formats the local time; we format UTC (containers and CI run in UTC). The clock can
//! be fixed so that renders are reproducible. Only the C-locale directives that templates use
//! are supported; any other is an error naming it, never a silent guess.

const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tm {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Monday
    weekday: u32,
    /// 1..=366
    yearday: u32,
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn tm_from_unix(secs: i64) -> Tm {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yearday = CUMULATIVE[month as usize - 1] + day + u32::from(month > 2 && is_leap(year));
    Tm {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem / 60 % 60) as u32,
        second: (rem % 60) as u32,
        // 1970-01-01 was a Thursday (3 with Monday = 0).
        weekday: (days + 3).rem_euclid(7) as u32,
        yearday,
    }
}

/// Formats `unix_secs` (UTC) like Python's `datetime.strftime(format)` in the C locale.
/// Supports `%a %A %b %B %d %m %y %Y %H %I %M %S %p %j %w %u %%`, and glibc's `%-` (no padding)
/// on the numeric ones.
pub(crate) fn strftime(format: &str, unix_secs: i64) -> Result<String, String> {
    let tm = tm_from_unix(unix_secs);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next().ok_or("the format ends with a lone `%`")?;
        let pad = if spec == '-' {
            spec = chars.next().ok_or("the format ends with `%-`")?;
            false
        } else {
            true
        };
        let num = |v: u32, width: usize| if pad { format!("{v:0width$}") } else { v.to_string() };
        let hour12 = if tm.hour.is_multiple_of(12) { 12 } else { tm.hour % 12 };
        let text = match spec {
            'a' => DAYS[tm.weekday as usize][..3].to_string(),
            'A' => DAYS[tm.weekday as usize].to_string(),
            'b' | 'h' => MONTHS[tm.month as usize - 1][..3].to_string(),
            'B' => MONTHS[tm.month as usize - 1].to_string(),
            'd' => num(tm.day, 2),
            'm' => num(tm.month, 2),
            'y' => num(tm.year.rem_euclid(100) as u32, 2),
            'Y' => tm.year.to_string(),
            'H' => num(tm.hour, 2),
            'I' => num(hour12, 2),
            'M' => num(tm.minute, 2),
            'S' => num(tm.second, 2),
            'p' => if tm.hour < 12 { "AM" } else { "PM" }.to_string(),
            'j' => num(tm.yearday, 3),
            'w' => ((tm.weekday + 1) % 7).to_string(),
            'u' => (tm.weekday + 1).to_string(),
            '%' => "%".to_string(),
            other => return Err(format!("unsupported strftime directive `%{other}`")),
        };
        out.push_str(&text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %y %H:%M:%S %I%p %j %w %u %%", t).unwrap(),
            "Friday July 26, 24 13:05:09 01PM 208 5 5 %"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 0).unwrap(), "1970-01-01 Thu");
        // Leap day and the end of a leap year.
        assert_eq!(strftime("%Y-%m-%d %j", 951_782_400).unwrap(), "2000-02-29 060");
        assert_eq!(strftime("%Y-%m-%d %j %a", 1_735_603_200).unwrap(), "2024-12-31 366 Tue");
        assert_eq!(strftime("%Y-%m-%d", -86_400).unwrap(), "1969-12-31");
    }

    #[test]
    fn rejects_unknown_directives() {
        assert_eq!(strftime("%Q", 0).unwrap_err(), "unsupported strftime directive `%Q`");
        assert!(strftime("50%", 0).is_err());
    }
}
