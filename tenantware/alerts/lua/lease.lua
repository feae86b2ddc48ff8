-- Take or renew the evaluation lease: KEYS[1] the lease, ARGV[1] the holder, ARGV[2] ms.
-- Returns 1 when ARGV[1] holds it now, 0 while another holder's lease runs.
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
