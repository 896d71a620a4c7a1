/*
 * ftvm built-in test guest: CMOS real-time clock. Each register is read
 * exactly once (no update-in-progress wait).
 */
#include "ftvm.h"

#define RTC_SECONDS 0x00
#define RTC_MINUTES 0x02
#define RTC_HOURS 0x04
#define RTC_DAY 0x07
#define RTC_MONTH 0x08
#define RTC_YEAR 0x09
#define RTC_STATUS_B 0x0b
#define RTC_B_24H 0x02
#define RTC_B_BINARY 0x04

static u8 cmos_read(u8 reg)
{
	outb(reg, CMOS_INDEX);
	return inb(CMOS_DATA);
}

static u32 bcd(u8 v, bool binary)
{
	return binary ? v : (u32)((v >> 4) * 10 + (v & 0x0f));
}

void rtc_read(struct rtc_time *t)
{
	u8 b = cmos_read(RTC_STATUS_B);
	bool bin = (b & RTC_B_BINARY) != 0;
	u8 sec = cmos_read(RTC_SECONDS);
	u8 min = cmos_read(RTC_MINUTES);
	u8 hour = cmos_read(RTC_HOURS);
	u8 day = cmos_read(RTC_DAY);
	u8 mon = cmos_read(RTC_MONTH);
	u8 year = cmos_read(RTC_YEAR);
	bool pm = false;

	if (!(b & RTC_B_24H)) {
		pm = (hour & 0x80) != 0;
		hour &= 0x7f;
	}
	t->second = bcd(sec, bin);
	t->minute = bcd(min, bin);
	t->hour = bcd(hour, bin);
	t->day = bcd(day, bin);
	t->month = bcd(mon, bin);
	t->year = 2000 + bcd(year, bin);
	if (!(b & RTC_B_24H)) {
		/* 12-hour mode: 12 AM is 0, 1-11 PM are 13-23. */
		if (t->hour == 12)
			t->hour = 0;
		if (pm)
			t->hour += 12;
	}
}
