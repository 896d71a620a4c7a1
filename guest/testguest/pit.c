/*
 * ftvm built-in test guest: 8254 PIT channel 0 as the periodic tick.
 */
#include "ftvm.h"

#define PIT_INPUT_HZ 1193182u

/* Channel 0, lobyte/hibyte access, mode 2 (rate generator), binary. */
#define PIT_CMD_CH0_MODE2 0x34
/* Counter-latch command for channel 0. */
#define PIT_CMD_LATCH_CH0 0x00
/*
 * Read-back command: bits 7-6 = 11, bit 5 = 0 latches the count, bit 4 = 0
 * latches the status (both active low), bit 1 selects channel 0. The
 * status byte is then read first, followed by the count's lo and hi bytes.
 */
#define PIT_CMD_READBACK_CH0 0xc2

volatile u64 ticks;

void pit_init(u64 hz)
{
	u32 div = (u32)((PIT_INPUT_HZ + hz / 2) / hz);

	if (div > 0xffff)
		div = 0xffff;
	if (div < 1)
		div = 1;
	outb(PIT_CMD_CH0_MODE2, PIT_CMD);
	outb((u8)div, PIT_CH0);
	outb((u8)(div >> 8), PIT_CH0);
}

void pit_irq(void)
{
	ticks = ticks + 1;
}

u16 pit_read(void)
{
	u8 lo, hi;

	outb(PIT_CMD_LATCH_CH0, PIT_CMD);
	lo = inb(PIT_CH0);
	hi = inb(PIT_CH0);
	return (u16)(lo | (hi << 8));
}

void pit_readback(u8 *status, u16 *count)
{
	u8 lo, hi;

	outb(PIT_CMD_READBACK_CH0, PIT_CMD);
	*status = inb(PIT_CH0);
	lo = inb(PIT_CH0);
	hi = inb(PIT_CH0);
	*count = (u16)(lo | (hi << 8));
}
